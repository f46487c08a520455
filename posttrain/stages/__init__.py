"""Stage kinds. Each module registers itself on import; this is the one place that imports them."""
from posttrain.stages import sft  # noqa: F401
