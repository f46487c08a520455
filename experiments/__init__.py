"""Research scripts that use posttrain from outside the package (the claims runner: `make claims`)."""
