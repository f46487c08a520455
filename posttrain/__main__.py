"""`python -m posttrain` (also what `accelerate launch -m posttrain` runs)."""
import sys

from posttrain.entry import main

sys.exit(main())
