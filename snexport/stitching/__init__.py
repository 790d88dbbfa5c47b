"""SN-Net stitching: the plan (pure enumeration), the stitching layers and the SN-Net module."""
