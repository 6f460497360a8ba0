"""Full fine-tuning: every parameter trains. The base module already does exactly this."""
from litft.methods.base import Finetune


class Full(Finetune):
    """Full fine-tuning: all weights train; the result is a complete litft checkpoint."""
