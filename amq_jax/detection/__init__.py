"""Object detection with RetinaNet: anchors, box coding, losses, NMS, COCO mAP, data, training.

The network itself is :class:`amq_jax.models.retinanet.RetinaNet` (registered as
``retinanet_resnet18``, ``retinanet_resnet50`` and ``retinanet_tiny``). Everything here is
jittable with fixed shapes: ground truth comes as padded arrays (``boxes [N, G, 4]``
(y1, x1, y2, x2) pixels, ``classes [N, G]`` with -1 padding), detections as
``max_detections`` rows with a ``valid`` mask.

>>> from amq_jax import detection, models
>>> model = models.get_model('retinanet_tiny')
>>> ds = detection.make_detection_set('train', 512, seed=0)          # Fashion-MNIST objects
>>> anchors = detection.anchors_for(model, (96, 96), anchor_scale=3.0)
>>> loss, parts = detection.detection_loss(model.apply(v, ds.images[:8]), ds.boxes[:8],
...                                        ds.classes[:8], anchors)
>>> detection.evaluate_map(model, v, test_ds, anchors=anchors)['mAP']

For Hessian analysis: ``detection_loss_fn(model, variables)`` is a ``loss_fn(params, batch)``
for :mod:`amq_jax.hessian`; ``activation_loss`` + ``pack_targets`` (with a model built with
``head_mode='packed'``) fit ``hessian.activation_traces``.
"""
from amq_jax.detection._anchors import (BACKGROUND, IGNORE, AnchorConfig, assign_anchors,
                                        assign_targets, feature_sizes, generate_anchors,
                                        num_anchors_per_level)
from amq_jax.detection._boxes import (BOX_WEIGHTS, box_area, clip_boxes, decode_boxes,
                                      encode_boxes, iou_matrix, yxyx_to_xywh)
from amq_jax.detection._coco_eval import COCO_METRICS, coco_evaluate
from amq_jax.detection._data import (MAX_GT, CocoSource, DetectionSet, DetectionSource,
                                     coco_batches, coco_example, detection_batches,
                                     make_detection_set, open_coco)
from amq_jax.detection._losses import (detection_loss, giou_loss, per_example_detection_loss,
                                       sigmoid_focal_loss, smooth_l1)
from amq_jax.detection._nms import batched_postprocess, nms, postprocess
from amq_jax.detection._train import (activation_loss, anchor_config_for, anchors_for,
                                      build_detector, detection_loss_fn, detection_sources,
                                      detection_train_loss, detector_apply_fn, evaluate_map,
                                      init_detector, loss_kwargs, make_detector_train_step,
                                      make_predict_fn, pack_targets, post_kwargs, predict,
                                      train_detector)
from amq_jax.detection._task import detection_input_shape, detection_task
from amq_jax.models.retinanet import RetinaNet

__all__ = [
    "RetinaNet",
    "AnchorConfig", "generate_anchors", "feature_sizes", "num_anchors_per_level",
    "assign_anchors", "assign_targets", "BACKGROUND", "IGNORE",
    "box_area", "iou_matrix", "encode_boxes", "decode_boxes", "clip_boxes", "yxyx_to_xywh",
    "BOX_WEIGHTS",
    "sigmoid_focal_loss", "smooth_l1", "giou_loss", "detection_loss",
    "per_example_detection_loss",
    "nms", "postprocess", "batched_postprocess",
    "coco_evaluate", "COCO_METRICS",
    "DetectionSet", "make_detection_set", "detection_batches", "coco_example", "coco_batches",
    "open_coco", "MAX_GT", "DetectionSource", "CocoSource",
    "anchor_config_for", "anchors_for", "detector_apply_fn", "make_detector_train_step",
    "make_predict_fn", "predict", "evaluate_map", "detection_loss_fn", "pack_targets",
    "activation_loss", "train_detector", "detection_train_loss", "build_detector",
    "detection_sources", "init_detector", "loss_kwargs", "post_kwargs",
    "detection_task", "detection_input_shape",
]
