"""The compression side: load a transformer, analyze its spectra, choose ranks under a budget,
convert its attention (and MLPs) to low rank, calibrate, distill, search, evaluate, save.

Layers, each importing only from those above it in this list (and from comcat.core):
  families, hub, models      the architecture interface (blocks, attention, MLPs); hub and transformers
                             loading; dense models
  analysis, ranks, lowrank   spectra; the RankConfig data type; the low-rank modules
  cost, rank_rules, convert  params / FLOPs / latency; rules that choose ranks; dense -> low rank
  format, load               the compressed-model folder; load_model(SPEC) of any kind
  images, splits, evaluate   the user's images, disjoint splits, scores
  calibrate, allocate, ...   fitting on images, rank allocation, block distillation, search, fine-tuning
  diagnose, report, plots    what Explore and the report show
  job                        one resumable compress run
"""
