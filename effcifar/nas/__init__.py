"""One-shot architecture search: the space, supernet training, search, export and ranking.

Importing the package registers its subnet builder with the core trainer, so that a TrainConfig
with `arch` (an architecture file) trains that subnet.
"""

from effcifar.nas.network import build_standalone
from effcifar.nas.space import load_arch_file
from effcifar.train import SubnetBuilder, register_subnet_builder

register_subnet_builder(SubnetBuilder(read=load_arch_file, build=build_standalone))
