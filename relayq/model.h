// relayq/model.h: run a model exported by relayq's CompiledModel.export from C++, without Python.
//
//   relayq::SetNumThreads(2);                       // optional; before the first model runs
//   relayq::Model model("mobilenet_int8.so");       // reads mobilenet_int8.so.json when present
//   std::vector<relayq::HostArray> out = model.Run({relayq::ReadNpy("x.npy")});
//
// The library is a Relax VM executable (TVM's export_library); the model runs on the CPU through
// the TVM runtime (libtvm_runtime.so, libtvm_ffi.so). Only tvm-ffi headers are needed: the wheel's
// tvm/runtime/tensor.h includes headers that the wheel does not ship.
#ifndef RELAYQ_MODEL_H_
#define RELAYQ_MODEL_H_

#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/container/tensor.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "npy.h"

namespace relayq {

/*! \brief A model that cannot be loaded or run with the given inputs; the message says why. */
class ModelError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/*! \brief One input of `main`: its name, and (when the export's .json is present) shape and dtype. */
struct InputSpec {
  std::string name;
  std::vector<int64_t> shape;  // empty when unknown
  std::string dtype;           // "" when unknown
};

/*!
 * \brief Set the number of worker threads of TVM's CPU thread pool (0: TVM's default, i.e.
 * OMP_NUM_THREADS or, on x86, half the logical cores).
 * TVM reads TVM_NUM_THREADS when its pool starts, so call this before the first model runs.
 */
void SetNumThreads(int num_threads);
/*! \brief The number of threads TVM's thread pool uses (this starts the pool). */
int NumThreads();

class Model {
 public:
  /*! \brief Load `library_path` (and `library_path + ".json"`, if it exists). Throws ModelError. */
  explicit Model(const std::string& library_path);

  const std::vector<InputSpec>& inputs() const { return inputs_; }
  /*! \brief The index of the input called `name` (throws ModelError naming the known inputs). */
  size_t InputIndex(const std::string& name) const;

  /*! \brief Run `main` on host arrays (in input order); returns its outputs, tuples flattened. */
  std::vector<HostArray> Run(const std::vector<HostArray>& inputs);
  /*! \brief Run `main` on TVM tensors (on the CPU); outputs flattened, as the VM returns them. */
  std::vector<tvm::ffi::Tensor> RunTensors(const std::vector<tvm::ffi::Tensor>& inputs);

  /*! \brief Milliseconds of `repeat` runs (after `warmup` untimed runs) on the same inputs. */
  std::vector<double> Time(const std::vector<HostArray>& inputs, int repeat, int warmup = 1);

  /*! \brief Copy host arrays into (64-byte aligned) CPU tensors, checking them against inputs(). */
  std::vector<tvm::ffi::Tensor> ToTensors(const std::vector<HostArray>& inputs) const;
  static HostArray ToHost(const tvm::ffi::Tensor& tensor);

 private:
  void ReadMetadata(const std::string& json_path);

  std::string path_;
  tvm::ffi::Module library_;
  tvm::ffi::Module vm_;
  tvm::ffi::Function main_;
  std::vector<InputSpec> inputs_;
};

}  // namespace relayq

#endif  // RELAYQ_MODEL_H_
