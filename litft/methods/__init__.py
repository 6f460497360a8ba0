"""One LightningModule per fine-tuning method. `METHODS` maps the command line's names to them: a new method
is a module here plus one entry."""
from litft.methods.base import Finetune
from litft.methods.delta_lora import DeltaLoRA
from litft.methods.dora import DoRA
from litft.methods.dpo import DPO
from litft.methods.full import Full
from litft.methods.lora import LoRA
from litft.methods.lora_fa import LoRAFA
from litft.methods.lora_plus import LoRAPlus
from litft.methods.neft import NEFT
from litft.methods.pissa import PiSSA
from litft.methods.qlora import QLoRA
from litft.methods.vera import VeRA

METHODS: dict[str, type[Finetune]] = {"lora": LoRA, "full": Full, "qlora": QLoRA, "dora": DoRA,
                                      "lora_plus": LoRAPlus, "neft": NEFT, "vera": VeRA, "dpo": DPO,
                                      "pissa": PiSSA, "lora_fa": LoRAFA,
                                      "delta_lora": DeltaLoRA}

__all__ = ["METHODS", "Finetune", "LoRA", "Full", "QLoRA", "DoRA", "LoRAPlus", "NEFT", "VeRA", "PiSSA", "DPO", "LoRAFA", "DeltaLoRA"]
