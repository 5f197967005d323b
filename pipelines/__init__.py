"""Diffusers pipelines of ipl-diffusion, one file per pipeline (as diffusers' community
pipelines are laid out), so that a pipeline's code file can be uploaded beside its weights."""
