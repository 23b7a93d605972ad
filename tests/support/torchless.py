"""Code to prepend to a subprocess's script so that importing torch fails in it: what a machine without
PyTorch sees (the runtime, calibration, serving and jobs must work there)."""

TORCH_BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked")
sys.meta_path.insert(0, Block())
"""
