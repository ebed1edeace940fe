"""RetinaNet (tiny ResNet backbone) on the Fashion-MNIST detection set: runs on a laptop CPU.

  python -c "from amq_jax import detection; import configs.retinanet_fmnist_det as c; \
             print(detection.train_detector(c.get_config(), 'runs/det')[1])"

Images are 96x96x1 canvases with 1-4 Fashion-MNIST items (21-42 px) each
(``amq_jax.detection.make_detection_set``); 10 classes. Anchors start at 3 x stride
(24 px on P3) since the objects are small.
Variants: ``:tiny`` is a seconds-long version for tests.

Mixed-precision ACTIVATIONS end to end (``amq_jax.detection.run_detection``; about 12-15
minutes on 2 busy CPU cores: FP32 1500 steps, analysis, 2 methods x 3 seeds x 300 QAT steps):

  amq-jax run --config configs/retinanet_fmnist_det.py --workdir runs/det_act

Sections used by that run (``task = 'detection'`` routes ``amq-jax run`` there):
``hessian`` (weight traces per Conv layer, activation traces of every layer's input),
``search`` (HAWQ-V2 weight bits at a size budget; activation bits at a separate activation
budget: ``act_budget`` is the activation memory ``sum_l elems_l * a_l``, where ``elems_l``
is layer l's input size per example; ``'uniform:6'`` = the memory of the uniform 6-bit
baseline, first and last layers at ``pin_first_last`` bits in every configuration;
``'avg:6.2'`` = an average of 6.2 bits weighted by ``elems_l``; ``'bits:N'``),
``finetune`` (QAT steps and learning rate, the same for both methods, and ``seeds``).
Measured (2 shared cores, 6.5 min end to end; FP32 mAP 0.493): at 'uniform:6' with (4, 6, 8)
HAWQ-V2 picks uniform 6 itself (mAP 0.493 +- 0.002); with (4, 5, 6, 7, 8) it lowers Omega_act
by 12% but gets mAP 0.489 +- 0.000 vs 0.493 +- 0.002; at 'uniform:4' with (3, 4, 5, 6, 8):
PTQ 0.422 vs 0.416, after QAT 0.444 +- 0.004 vs uniform 0.456 +- 0.004.
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "retinanet_tiny"
  c.model_kwargs = ml_collections.ConfigDict({"num_classes": 10})
  c.dataset = "fmnist_det"
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.canvas = 96
  c.channels = 1
  c.max_gt = 8
  c.max_objects = 4
  c.train_images = 4096
  c.test_images = 512
  c.anchor_scale = 3.0
  c.seed = 0
  c.progress = True
  # CPU devices to split every batch over: 1 = JAX's single CPU device; 'auto' = one
  # per core (~0.7x the QAT step time on 2 cores; opt-in, see amq_jax/_hostdev.py).
  c.host_devices = ml_collections.FieldReference(1, field_type=object)  # 1 | "auto" | N

  # Optimization: the same section shape as every config. `c.train` (FP32 training) and
  # `c.finetune` (QAT) have the fields optimizer ('sgd' | 'adam'), learning_rate, momentum,
  # weight_decay (kernels only), warmup_steps, final_lr_fraction (end of the cosine decay),
  # clip_grad_norm (0/None = off), batch_size (global), num_epochs or num_steps (one set,
  # the other None; num_steps wins), augment (here: horizontal flips), checkpoint_every_steps,
  # log_every_steps, eval_batch_size; `c.finetune` adds calib_examples, calib_method and
  # seeds (fine-tuning seeds, i.e. data orders, of each method).
  c.train = ml_collections.ConfigDict(dict(
      optimizer="adam", learning_rate=2e-3, momentum=0.9, weight_decay=0.0, warmup_steps=50,
      final_lr_fraction=0.05, clip_grad_norm=10.0, batch_size=32, num_epochs=None,
      num_steps=1500, augment=True, checkpoint_every_steps=250, log_every_steps=50,
      eval_batch_size=128))

  c.loss = ml_collections.ConfigDict(dict(alpha=0.25, gamma=2.0, beta=0.1,
                                          box_loss="smooth_l1", box_weight=1.0))
  c.eval = ml_collections.ConfigDict(dict(score_threshold=0.05, pre_nms_topk=300,
                                          iou_threshold=0.5, max_detections=20))

  # amq-jax run: the one pipeline with the detection task (amq_jax.detection.detection_task):
  # activation mixed precision, end to end. Both methods get HAWQ-V2 weight bits; 'hawq_v2'
  # takes Hessian-chosen activation widths, 'uniform_act' uniform ones at the same
  # activation budget.
  c.task = "detection"
  c.methods = ("hawq_v2", "uniform_act")
  c.hessian = ml_collections.ConfigDict(dict(
      seed=0, num_examples=32, batch_size=32,  # weight traces: one batch of 32 train images
      estimator="per_layer", rtol=0.15, min_probes=4, max_probes=8,
      compare=None, compare_max_probes=None,  # a second curvature (see resnet20_fmnist.py)
      act_examples=32, act_probes=8,  # activation traces: per example, 8 probes each
      calib_examples=256))  # activation ranges/errors for Omega_act (FP32 model)
  # The deployed integer grid, 'amq' or 'qwix' (see configs/resnet20_fmnist.py).
  c.quant = ml_collections.ConfigDict(dict(grid="amq"))
  c.search = ml_collections.ConfigDict(dict(
      bit_choices=(2, 3, 4, 8), budget="uniform:4", pin_first_last=8, symmetric=True,
      act_bit_choices=(4, 6, 8), act_budget="uniform:6", act_pin_first_last=8,
      # True: layers that read the same tensor (found from the traced layer table, e.g. the
      # first convs of the class and box subnets) share one ACTIVATION width: one tensor,
      # one quantizer.
      tie_shared_inputs=False))
  c.finetune = ml_collections.ConfigDict(dict(
      optimizer="adam", learning_rate=2e-4, momentum=0.9, weight_decay=0.0, warmup_steps=20,
      final_lr_fraction=0.05, clip_grad_norm=10.0, batch_size=32, num_epochs=None,
      num_steps=300, augment=True, checkpoint_every_steps=100, log_every_steps=100,
      eval_batch_size=128,
      calib_examples=256, calib_method="minmax", seeds=(0, 1, 2)))

  if variant == "tiny":
    c.train_images = 64
    c.test_images = 16
    c.train.update(dict(batch_size=8, num_steps=6, warmup_steps=0, checkpoint_every_steps=3,
                        log_every_steps=3, eval_batch_size=16))
    c.hessian.update(dict(num_examples=8, batch_size=8, min_probes=4, max_probes=4,
                          act_examples=8, act_probes=2, calib_examples=16))
    c.finetune.update(dict(num_steps=3, batch_size=8, warmup_steps=0, calib_examples=16,
                           checkpoint_every_steps=2, log_every_steps=3, eval_batch_size=16,
                           seeds=(0,)))
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of retinanet_fmnist_det; use '' or 'tiny'")
  return c
