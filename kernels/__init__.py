"""Hot compute paths of snip_lens, each with a plain reference version and an equality test.

Installed as ``snip_lens.kernels`` (never as a top-level ``kernels`` package, which is the name of a
Hugging Face package that transformers imports when it is installed).
"""
