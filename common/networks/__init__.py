"""3D segmentation networks: U-Mamba (Bot/Enc) and MONAI baselines, built by name.

    from common.networks import create_model, list_models, as_output_list
    model = create_model("umamba-bot", in_channels=3, out_channels=2)

See ``factory`` for the output convention (deep supervision in training mode).
"""

from common.networks.factory import (
    as_output_list,
    create_model,
    get_default_config,
    list_models,
    main_output,
    register_model,
)
from common.networks.mamba_layer import MambaLayer, mamba_ssm_available
from common.networks.umamba import UMAMBA_PRESETS, UMamba

__all__ = [
    "UMAMBA_PRESETS",
    "MambaLayer",
    "UMamba",
    "as_output_list",
    "create_model",
    "get_default_config",
    "list_models",
    "main_output",
    "mamba_ssm_available",
    "register_model",
]
