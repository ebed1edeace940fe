"""RetinaNet-ResNet50-FPN on COCO 2017 (the HAWQ-V2 detection setting), 640x640 inputs.

  amq-jax train --config configs/retinanet_coco.py --workdir runs/retinanet_coco \
      --config.data_dir=DIR

Needs ``coco/2017`` prepared by TFDS in ``data_dir`` (``tfds build coco/2017
--data_dir=... --file_format=array_record`` on a machine with internet access) and
pycocotools (``pip install 'amq-jax[det]'``). Schedule as Detectron's 1x at batch 16:
90k steps, SGD 0.01 with warm-up, weight decay 1e-4. The backbone should start from
ImageNet weights (``params['backbone']`` uses ImageNetResNet's module names; copy
``resnet50`` weights in, drop ``fc``), with its BatchNorm frozen.
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "retinanet_resnet50"
  c.model_kwargs = ml_collections.ConfigDict({"num_classes": 80, "freeze_backbone_bn": True})
  c.dataset = "coco"
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.train_split = "train"
  c.eval_split = "validation"
  c.train_limit = ml_collections.FieldReference(None, field_type=int)
  c.eval_limit = ml_collections.FieldReference(None, field_type=int)
  c.image_size = 640
  c.channels = 3
  c.max_gt = 100
  c.anchor_scale = 4.0
  c.seed = 0
  c.progress = True
  # CPU devices to split every batch over: 1 = JAX's single CPU device; 'auto' = one
  # per core (~0.7x the QAT step time on 2 cores; opt-in, see amq_jax/_hostdev.py).
  c.host_devices = ml_collections.FieldReference(1, field_type=object)  # 1 | "auto" | N

  # Optimization: the same section shape as every config. `c.train` (FP32 training) and
  # `c.finetune` (QAT) have the fields optimizer ('sgd' | 'adam'), learning_rate, momentum,
  # weight_decay (kernels only), warmup_steps, final_lr_fraction (end of the cosine decay),
  # clip_grad_norm (0/None = off), batch_size (global), num_epochs or num_steps (one set,
  # the other None; num_steps wins), augment, checkpoint_every_steps, log_every_steps,
  # eval_batch_size; `c.finetune` adds calib_examples, calib_method and seeds.
  c.train = ml_collections.ConfigDict(dict(
      optimizer="sgd", learning_rate=0.01, momentum=0.9, weight_decay=1e-4, warmup_steps=1000,
      final_lr_fraction=0.0, clip_grad_norm=0.0, batch_size=16, num_epochs=None,
      num_steps=90_000, augment=False, checkpoint_every_steps=2000, log_every_steps=100,
      eval_batch_size=16))
  # The deployed integer grid, 'amq' or 'qwix' (see configs/resnet20_fmnist.py).
  c.quant = ml_collections.ConfigDict(dict(grid="amq"))
  # Not measured yet: a tenth of the schedule at a tenth of the rate.
  c.finetune = ml_collections.ConfigDict(dict(
      optimizer="sgd", learning_rate=1e-3, momentum=0.9, weight_decay=1e-4, warmup_steps=0,
      final_lr_fraction=0.0, clip_grad_norm=0.0, batch_size=16, num_epochs=None,
      num_steps=9_000, augment=False, checkpoint_every_steps=1000, log_every_steps=100,
      eval_batch_size=16,
      calib_examples=256, calib_method="minmax", seeds=(0,)))

  c.loss = ml_collections.ConfigDict(dict(alpha=0.25, gamma=2.0, beta=0.1,
                                          box_loss="smooth_l1", box_weight=1.0))
  c.eval = ml_collections.ConfigDict(dict(score_threshold=0.05, pre_nms_topk=1000,
                                          iou_threshold=0.5, max_detections=100))
  if variant == "tiny":  # shape check on a handful of images
    c.model = "retinanet_resnet18"
    c.image_size = 128
    c.train_limit = 16
    c.eval_limit = 8
    c.train.update(dict(batch_size=8, eval_batch_size=8, num_steps=2, warmup_steps=0))
    c.finetune.update(dict(batch_size=8, eval_batch_size=8, num_steps=2, calib_examples=8))
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of retinanet_coco; use '' or 'tiny'")
  return c
