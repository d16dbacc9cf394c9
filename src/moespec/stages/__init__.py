"""The pipeline's stages, one module (or package) each, all satisfying :class:`moespec.stages.base.Stage`.

- ``base``: the stage contract, the config base class, the registry (pipeline order);
- ``embed``: texts -> HF transformers embeddings (or a model's token-embedding matrix);
- ``reduce``: streaming PCA and intrinsic dimension of the embeddings;
- ``fiber``: the Robinson-Dey-Chiang fiber-bundle / manifold test and strata;
- ``train``: an MoE model (dictionary experts or top-k classifier) on the reduced embeddings, and
  its dense twin;
- ``lm``: a dense or MoE decoder language model over transformers' architectures, as an HF folder;
- ``lora``: one PEFT LoRA adapter per domain over a base LM (one array task per domain);
- ``route``: routers over those adapters (keyword, learned, oracle, base, merge), judged together;
- ``ablate``: expert ablation and specialisation, on a trained model, an lm model or a pretrained HF MoE.

A stage module imports torch and other heavy libraries only inside functions, so that validating
and planning an experiment stays cheap.
"""
