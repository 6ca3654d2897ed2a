"""ControlNet: control images (`images`), preprocessors (`preprocessors`), ControlNet models (`models`)
and the units of one job (`units`).

The package re-exports what the old flat module ``pipelines.control`` offered.
"""

from pipelines.control.images import (  # noqa: F401 - the old module's names
    ASPECT_TOLERANCE,
    CONTROL_FORMATS,
    MAX_CONTROL_PIXELS,
    crop_box,
    load_control_image,
    prepare_control_image,
)
from pipelines.control.models import (  # noqa: F401 - the old module's names
    CONTROLNET_CATALOGUE,
    list_controlnets,
    load_controlnet,
    resolve_controlnet,
)
from pipelines.control.preprocessors import (  # noqa: F401 - the old module's names
    ANNOTATORS,
    PREPROCESSORS,
    Annotator,
    canny,
    preprocess,
)
