"""Editing: inpainting and outpainting masks and blending (`inpaint`) and the job that runs them (`run`)."""
