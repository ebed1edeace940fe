"""ResNet20 on Fashion-MNIST: the embedded default, end to end on a laptop.

  amq-jax run   --config configs/resnet20_fmnist.py --workdir runs/default
  amq-jax train --config configs/resnet20_fmnist.py --workdir runs/default   # FP32 only

Variants: ``--config configs/resnet20_fmnist.py:tiny`` is a seconds-long version for tests.
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "resnet20"
  c.model_kwargs = ml_collections.ConfigDict({"num_classes": 10})
  c.input_shape = (28, 28, 1)
  c.dataset = "fashion_mnist"
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.train_limit = ml_collections.FieldReference(None, field_type=int)
  c.test_limit = ml_collections.FieldReference(None, field_type=int)
  # Shipped FP32 checkpoint (amq_jax/assets/<name>.msgpack) used when the workdir has none.
  c.pretrained = "resnet20_fmnist"
  c.seed = 0
  c.progress = True
  # CPU devices to split every batch over: 1 = JAX's single CPU device; 'auto' = one
  # per core (~0.7x the QAT step time on 2 cores; opt-in, see amq_jax/_hostdev.py).
  c.host_devices = ml_collections.FieldReference(1, field_type=object)  # 1 | "auto" | N

  # Optimization: one shape in every config. `c.train` (FP32 training) and `c.finetune`
  # (quantization-aware fine-tuning) have the same fields, read by amq_jax.train.fit and
  # make_optimizer: optimizer ('sgd' = Nesterov momentum, or 'adam'), learning_rate,
  # momentum, weight_decay (kernels only), warmup_steps, final_lr_fraction (end of the
  # cosine decay), clip_grad_norm (0/None = off), batch_size (global), num_epochs or
  # num_steps (one set, the other None; num_steps wins), augment, checkpoint_every_steps,
  # log_every_steps, eval_batch_size. `c.finetune` adds calib_examples, calib_method and
  # seeds (the fine-tuning seeds). Override as --config.train.learning_rate=0.05.
  c.train = ml_collections.ConfigDict(dict(  # reproduces the shipped checkpoint
      optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=5e-4, warmup_steps=200,
      final_lr_fraction=0.0, clip_grad_norm=None, batch_size=128, num_epochs=10.0,
      num_steps=None, augment=True, checkpoint_every_steps=200, log_every_steps=50,
      eval_batch_size=1000))

  # Stage 'analyze': Hessian traces and eigenvalues on the first training images.
  c.hessian = ml_collections.ConfigDict()
  # The default measures every layer to a stated precision within the ~20 minute run:
  # Gauss-Newton curvature (PSD, equal to the Hessian up to the residual term that vanishes
  # at a trained minimum; one backward pass per probe gives every layer), each layer
  # stopped when its Student-t interval at `confidence` (0.6827: one standard error) is
  # within rtol of the trace. The paper's Hessian is one flag away:
  # --config.hessian.curvature=hessian (estimator hutchpp: ~2.6x fewer HVPs than per_layer
  # to 5% on ResNet20). Figures: benchmarks/RESULTS.md (bench_curvature.py).
  c.hessian.curvature = "ggn"    # 'hessian' | 'ggn' | 'fisher'
  # GGN only: 'exact' (one per-example backward pass per class, no sampling error),
  # 'sampled' (output-space probes to rtol) or 'auto' = exact when the classes are no more
  # than min_probes (then exact is never dearer: ResNet20 8.9 s exact vs 68 s sampled).
  c.hessian.ggn_method = "auto"
  # A second curvature measured beside the first, for the report's side by side (rank
  # correlation across layers, the bits it would pick): None (off) or another curvature,
  # e.g. --config.hessian.compare=hessian; its own probe cap (None: max_probes).
  c.hessian.compare = None
  c.hessian.compare_max_probes = None
  c.hessian.num_examples = 256
  c.hessian.batch_size = 128
  c.hessian.estimator = "hutchpp"  # Hessian estimator: 'hutchpp' | 'per_layer' | 'joint'
  c.hessian.rtol = 0.05          # relative precision of every layer's trace
  c.hessian.confidence = 0.6827  # of the Student-t interval (one standard error)
  c.hessian.min_probes = 10
  c.hessian.max_probes = 400
  c.hessian.seed = 0
  c.hessian.eig_batches = 1      # batches used for eigenvalues
  c.hessian.eig_tol = 1e-3
  c.hessian.top1_method = "lanczos"  # top eigenvalue of every layer (HAWQ-V1 baseline)
  c.hessian.top1_iters = 10
  c.hessian.eig_k = 20           # top-k spectrum of eig_layers (the seed's Fig. 1)
  c.hessian.spectrum_iters = 60
  c.hessian.eig_layers = ("stage1_block1/conv1", "stage3_block3/conv2")

  # The integer grid the quantized model is deployed on, read by every stage that quantizes
  # (its own section because no one stage owns it): the search's Omega table, fine-tuning's
  # fake-quant, the activation errors and the packed export. 'amq' (amq-jax's own, 1..16
  # bits) or 'qwix' (the grid qwix deploys with, bit for bit: widths 2..8, inputs quantized
  # per example; use it when the model will run under qwix): --config.quant.grid=qwix.
  # Changing it recomputes search and fine-tuning, never the analysis.
  c.quant = ml_collections.ConfigDict(dict(grid="amq"))

  # Stage 'search': bit choices, pins, the budget.
  c.search = ml_collections.ConfigDict()
  c.search.bit_choices = (2, 3, 4, 8)
  c.search.budget = "uniform:3"  # or '0.12MB', 'avg:3', 'bits:N'
  c.search.pin_first_last = 8    # first and last layer at 8 bits (0: free)
  c.search.symmetric = True
  c.search.act_bits = 8          # input activations of every quantized layer (None: float)
  c.search.tie = ()              # tuples of layer regexes that must share bits
  c.baselines = "default"        # 'default': HAWQ-V2 + uniform; 'all': every baseline
  c.num_random = 3

  # Stage 'finetune': quantization-aware training from the FP32 model.
  c.finetune = ml_collections.ConfigDict(dict(
      optimizer="sgd", learning_rate=0.01, momentum=0.9, weight_decay=1e-4, warmup_steps=0,
      final_lr_fraction=0.0, clip_grad_norm=None, batch_size=128, num_epochs=1.0,
      num_steps=None, augment=True, checkpoint_every_steps=200, log_every_steps=50,
      eval_batch_size=1000,
      calib_examples=512, calib_method="percentile", seeds=(0,)))

  if variant == "tiny":
    c.model = "resnet_tiny"
    c.pretrained = ""
    c.train_limit = 512
    c.test_limit = 256
    c.train.update(dict(batch_size=64, num_epochs=2.0, warmup_steps=0, learning_rate=0.05,
                        checkpoint_every_steps=4, log_every_steps=4, eval_batch_size=128))
    c.hessian.num_examples = 128
    c.hessian.batch_size = 64
    c.hessian.rtol = 0.2
    c.hessian.min_probes = 4
    c.hessian.max_probes = 12
    c.hessian.top1_iters = 5
    c.hessian.spectrum_iters = 12
    c.hessian.eig_k = 4
    c.hessian.eig_layers = ("stage1_block1/conv1",)
    c.finetune.update(dict(batch_size=64, num_epochs=1.0, calib_examples=64,
                           checkpoint_every_steps=4, log_every_steps=4, eval_batch_size=128))
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of resnet20_fmnist; use '' or 'tiny'")
  return c
