"""Models: the manager that owns every loaded weight (`manager`), tiny test models (`tiny`), upscalers
(`upscalers`) and size estimates (`sizes`).

The package re-exports what the old flat module ``pipelines.models`` (now `manager`) offered.
"""

from pipelines.models.manager import (  # noqa: F401 - the old module's names
    CATALOGUE,
    DTYPES,
    LOAD_LOCK,
    LORA_CATALOGUE,
    SINGLE_FILE_CONFIGS,
    TAESD_CATALOGUE,
    LoadedModel,
    ModelManager,
    Source,
    pick_device,
    warm_up,
)
