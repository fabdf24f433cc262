"""The transformers integration: registration, what prepack supports, and what it reads of a model.

* :mod:`.registration`: prepack's attention registered with transformers' ``AttentionInterface`` (never a patch),
  the reference-counted switch every entry point holds, and the padding-free training layout;
* :mod:`.support`: what prepack supports, as code (``check_model``, ``layer_attention``);
* :mod:`.rope`: RoPE whose frequencies depend on the sequence length; :mod:`.wrapped`: PEFT and ``torch.compile``;
* :mod:`.inputs`: what callers pass in, checked into token arrays; :mod:`.vision`: prompts with images;
* :mod:`.model`: the facts the executor asks of a model (default token budget, LM head, decoder stack).
"""
