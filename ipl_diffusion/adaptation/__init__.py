"""Stage 2 trainers: ``diffae`` (Diff-IPL) and ``stylegan2`` (GAN-IPL with NADA layer freezing).

No imports here: each trainer is imported from its own module.
"""
