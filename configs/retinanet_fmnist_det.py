"""RetinaNet (tiny ResNet backbone) on the Fashion-MNIST detection set: runs on a laptop CPU.

  python -c "from amq_jax import detection; import configs.retinanet_fmnist_det as c; \
             print(detection.train_detector(c.get_config(), 'runs/det')[1])"

Images are 96x96x1 canvases with 1-4 Fashion-MNIST items (21-42 px) each
(``amq_jax.detection.make_detection_set``); 10 classes. Anchors start at 3 x stride
(24 px on P3) since the objects are small.
Variants: ``:tiny`` is a seconds-long version for tests.
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
  c.flip = True
  c.anchor_scale = 3.0
  c.seed = 0

  c.optimizer = "adam"
  c.learning_rate = 2e-3
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.warmup_steps = 50
  c.final_lr_fraction = 0.05
  c.clip_grad_norm = 10.0
  c.batch_size = 32
  c.num_steps = 1500
  c.eval_batch_size = 128
  c.checkpoint_every_steps = 250
  c.log_every_steps = 50

  c.loss = ml_collections.ConfigDict(dict(alpha=0.25, gamma=2.0, beta=0.1,
                                          box_loss="smooth_l1", box_weight=1.0))
  c.eval = ml_collections.ConfigDict(dict(score_threshold=0.05, pre_nms_topk=300,
                                          iou_threshold=0.5, max_detections=20))
  if variant == "tiny":
    c.train_images = 64
    c.test_images = 16
    c.batch_size = 8
    c.num_steps = 6
    c.warmup_steps = 0
    c.checkpoint_every_steps = 3
    c.log_every_steps = 3
    c.eval_batch_size = 16
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of retinanet_fmnist_det; use '' or 'tiny'")
  return c
