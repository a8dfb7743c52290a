#include "common/status.h"

namespace jaxdnn {

std::string CudnnStatusMessage(cudnnStatus_t status) {
  std::string message = cudnnGetErrorString(status);
  // cuDNN 9 keeps a thread-local explanation of the last failure; it is often the only
  // place that says which parameter was wrong.
  char detail[1024] = {0};
  cudnnGetLastErrorString(detail, sizeof(detail));
  if (detail[0] != '\0') {
    message += ": ";
    message += detail;
  }
  return message;
}

}  // namespace jaxdnn
