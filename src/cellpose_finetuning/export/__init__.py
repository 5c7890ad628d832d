"""Export trained models (:mod:`cellpose_finetuning.export.bioimageio`: BioImage.IO packages)."""
