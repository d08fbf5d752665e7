"""The stages of quantization, each a public function returning an IRModule you can print."""
from .annotate import annotate
from .calibrate import calibrate
from .prepare import prepare
from .realize import realize

__all__ = ["prepare", "annotate", "calibrate", "realize"]
