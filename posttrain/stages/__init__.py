"""Stage kinds. Each module registers itself on import; this is the one place that imports them."""
from posttrain.stages import sft  # noqa: F401
from posttrain.stages import merge  # noqa: F401
from posttrain.stages import dpo  # noqa: F401
from posttrain.stages import grpo  # noqa: F401
from posttrain.stages import transfer  # noqa: F401
from posttrain.stages import kto  # noqa: F401
from posttrain.stages import orpo  # noqa: F401
from posttrain.stages import simpo  # noqa: F401
from posttrain.stages import reward  # noqa: F401
from posttrain.stages import rloo  # noqa: F401
