"""ControlNet: control images (`images`), preprocessors (`preprocessors`), ControlNet models (`models`)
and the units of one job (`units`). Import from the submodules.
"""
