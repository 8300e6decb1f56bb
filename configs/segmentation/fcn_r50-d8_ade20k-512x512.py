# Paper Table 9 with MMSegmentation's own recipe: FCN, ResNet-50 dilated in stages 3 and 4 (output stride 8),
# ADE20K 512x512 crops, 80k iterations, batch 16, single-scale test; MMSegmentation publishes 35.94 mIoU with
# ResNetV1c. python -m segmentation.train sets the backbone type (A/B/C/D -> ResNet/ResNetV1c/ResNetV1d) and
# pretrained weights from the export and clears the stock 'pretrained' URL; dilations/strides stay as here.
_base_ = 'mmseg::fcn/fcn_r50-d8_4xb4-80k_ade20k-512x512.py'

model = dict(pretrained=None)
auto_scale_lr = dict(enable=False, base_batch_size=16)  # lr 0.01 is for 4 GPUs x 4 images
