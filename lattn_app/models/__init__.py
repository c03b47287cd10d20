"""Task networks that are not backbones: the stereo matching network (and detection necks)."""
