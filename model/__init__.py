"""ASDA in pure PyTorch: features, differential attention, the encoder and the pretraining objective."""

from .asda import ASDA, ema_decay
from .attention import DifferentialAttention, HeadwiseRMSNorm, StandardAttention, build_attention
from .block import Block
from .checkpoint import load_checkpoint, load_encoder, read_state, save_checkpoint
from .config import ASDAConfig
from .decoder import CNNDecoder
from .encoder import READOUTS, ASDAEncoder, read_out
from .features import DATASET_STATS, fbank, log_mel, normalise, pad_or_crop
from .head import ASDAClassifier, ClassificationHead, param_groups_layer_decay, param_groups_weight_decay
from .masking import inverse_block_mask, visible_indices
from .pretrained import feature_settings, load_pretrained, load_pretrained_classifier

__all__ = [
    "ASDA", "ASDAClassifier", "ASDAConfig", "ASDAEncoder", "Block", "CNNDecoder", "ClassificationHead",
    "DATASET_STATS", "READOUTS", "DifferentialAttention", "HeadwiseRMSNorm", "StandardAttention", "build_attention",
    "ema_decay", "fbank", "feature_settings", "inverse_block_mask", "load_checkpoint", "load_encoder",
    "load_pretrained", "load_pretrained_classifier", "log_mel", "normalise",
    "pad_or_crop", "read_out", "param_groups_layer_decay", "param_groups_weight_decay", "read_state", "save_checkpoint",
    "visible_indices",
]
