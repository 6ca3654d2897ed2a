"""Models: the manager that owns every loaded weight (`manager`), the loaders (`loading`), tiny test models
(`tiny`), upscalers (`upscalers`) and size estimates (`sizes`). Import from the submodules.
"""
