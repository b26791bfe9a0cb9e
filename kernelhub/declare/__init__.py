"""The declaration API: what model files use to say *what* they compute.

Attention sites (`site`), swappable layers (`layer`), masks (`masks`, `attention_mask`,
`varlen`, `paged`), KV caches (`cache`, `paged_cache`), output capture (`capture`), the
reference attention (`eager`) and every error kernelhub raises (`errors`). It imports only
torch: backends implement it, the registry binds it, model files import nothing else.
"""
