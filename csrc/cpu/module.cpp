// resnet_fused._cpu_<capability>: the CPU kernels, built once per instruction set (generic, AVX2);
// resnet_fused.backends loads the one torch.backends.cpu.get_cpu_capability() allows.
#include "python_module.h"

RF_PYTHON_MODULE()
