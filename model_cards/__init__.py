"""Model-card templates of hf_sdt, installed as `hf_sdt.model_cards` (Jinja, rendered by `hf_sdt.hub`)."""
