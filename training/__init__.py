"""Training recipe for diffshield's three models (classifier, denoiser_s, denoiser_m).

Not needed at run time: the Rust runtime only reads the exported ONNX files and models.toml.
See training/README.md.
"""
