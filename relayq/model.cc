// relayq/model.cc: load a Relax VM executable from a shared library and run `main`.
#include "model.h"

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/function.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <new>
#include <sstream>
#include <streambuf>

namespace relayq {

namespace ffi = tvm::ffi;
using tvm::ffi::Tensor;

namespace {

// TVM's kernels assume 64-byte aligned buffers (tvm::runtime::kAllocAlignment).
constexpr size_t kAlignment = 64;

struct AlignedCPUAlloc {
  void AllocData(DLTensor* t) {
    size_t nbytes = ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(kAlignment, (nbytes + kAlignment - 1) / kAlignment * kAlignment + kAlignment);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

// tvm::runtime::memory::AllocatorType::kPooled: the VM reuses freed buffers between runs.
constexpr int kPooledAllocator = 2;

std::string ShapeText(const std::vector<int64_t>& shape) {
  HostArray a;
  a.shape = shape;
  a.dtype = "";
  std::string s = a.Describe();
  return s.substr(0, s.size() - 1);  // drop the trailing " "
}

// TVM's dtype names ("float32", "int8", "bool") are NumPy's for the types relayq uses.
DLDataType ToDLDataType(const std::string& dtype) {
  HostArray::ItemSize(dtype);  // rejects what the .npy side cannot represent
  return ffi::StringToDLDataType(dtype);
}

void FlattenOutputs(const ffi::Any& value, std::vector<Tensor>* out) {
  if (auto t = value.try_cast<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (auto arr = value.try_cast<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& v : *arr) FlattenOutputs(v, out);
  } else {
    throw ModelError("the model returned a value that is neither a tensor nor a tuple (" +
                     std::string(value.GetTypeKey()) + ")");
  }
}

}  // namespace

void SetNumThreads(int num_threads) {
  if (num_threads < 0) throw ModelError("the number of threads must be >= 0");
  if (num_threads == 0) {
    unsetenv("TVM_NUM_THREADS");
  } else {
    setenv("TVM_NUM_THREADS", std::to_string(num_threads).c_str(), 1);
  }
}

int NumThreads() {
  auto f = ffi::Function::GetGlobal("runtime.NumThreads");
  if (!f.has_value()) return 1;
  return (*f)().cast<int>();
}

namespace {

// TVM's runtime logs one "executable.cc:NNN: Warning: Scope Loaded:<scope>" line per constant when it
// reads a Relax VM executable (LOG(WARNING) on std::cerr, which no setting turns off). While one of
// these is alive, std::cerr drops exactly those lines and passes every other line through.
class ScopeChatterFilter : public std::streambuf {
 public:
  ScopeChatterFilter() : target_(std::cerr.rdbuf(this)) {}
  ~ScopeChatterFilter() override {
    if (!line_.empty()) Emit();
    std::cerr.rdbuf(target_);
  }
  ScopeChatterFilter(const ScopeChatterFilter&) = delete;
  ScopeChatterFilter& operator=(const ScopeChatterFilter&) = delete;

 protected:
  int_type overflow(int_type ch) override {
    if (traits_type::eq_int_type(ch, traits_type::eof())) return traits_type::not_eof(ch);
    line_.push_back(traits_type::to_char_type(ch));
    if (ch == '\n') Emit();
    return ch;
  }
  int sync() override { return target_->pubsync(); }

 private:
  void Emit() {
    const bool chatter = line_.find("executable.cc:") != std::string::npos &&
                         (line_.find("Warning: Scope Loaded:") != std::string::npos ||
                          line_.find("Warning: Scope Saving:") != std::string::npos);
    if (!chatter) target_->sputn(line_.data(), static_cast<std::streamsize>(line_.size()));
    line_.clear();
  }
  std::streambuf* target_;
  std::string line_;
};

ffi::Module LoadLibrary(const std::string& path) {
  if (!std::ifstream(path).good()) throw ModelError(path + ": no such file");
  try {
    ScopeChatterFilter quiet;
    return ffi::Module::LoadFromFile(path);
  } catch (const ffi::Error& e) {
    throw ModelError(path + ": cannot load the library: " + e.message());
  }
}

ffi::Module StartVM(const ffi::Module& library, const std::string& path) {
  auto load = library->GetFunction("vm_load_executable", true);
  if (!load.has_value()) {
    throw ModelError(path + ": not a Relax VM executable (export it with CompiledModel.export)");
  }
  try {
    ScopeChatterFilter quiet;
    ffi::Module vm = (*load)().cast<ffi::Module>();
    // One (device type, device id, allocator) triple per device: the CPU, which is also the host.
    (*vm->GetFunction("vm_initialization", false))(static_cast<int>(kDLCPU), 0, kPooledAllocator);
    return vm;
  } catch (const ffi::Error& e) {
    throw ModelError(path + ": cannot start the Relax VM: " + e.message());
  }
}

}  // namespace

Model::Model(const std::string& library_path)
    : path_(library_path), library_(LoadLibrary(library_path)), vm_(StartVM(library_, library_path)) {
  try {
    auto main = vm_->GetFunction("main", false);
    if (!main.has_value()) throw ModelError(library_path + ": the executable has no function main");
    main_ = *main;
    const int arity = (*vm_->GetFunction("get_function_arity", false))("main").cast<int>();
    auto param_name = *vm_->GetFunction("get_function_param_name", false);
    for (int i = 0; i < arity; ++i) {
      inputs_.push_back({param_name("main", i).cast<std::string>(), {}, ""});
    }
  } catch (const ffi::Error& e) {
    throw ModelError(library_path + ": cannot read the signature of main: " + e.message());
  }
  ReadMetadata(library_path + ".json");
}

void Model::ReadMetadata(const std::string& json_path) {
  std::ifstream f(json_path);
  if (!f) return;  // the runner works without it; it only adds shape and dtype checks
  std::stringstream buf;
  buf << f.rdbuf();
  ffi::String error;
  ffi::Any meta = ffi::json::Parse(buf.str(), &error);
  if (!error.empty()) throw ModelError(json_path + ": not valid JSON: " + std::string(error));
  // {"inputs": [[name, shape, dtype], ...], ...}: other fields are free to grow.
  try {
    auto obj = meta.cast<ffi::Map<ffi::Any, ffi::Any>>();
    auto it = obj.find(ffi::String("inputs"));
    if (it == obj.end()) return;
    auto specs = (*it).second.cast<ffi::Array<ffi::Any>>();
    if (specs.size() != inputs_.size()) {
      throw ModelError(json_path + " describes " + std::to_string(specs.size()) +
                       " inputs but the library's main takes " + std::to_string(inputs_.size()));
    }
    for (size_t i = 0; i < specs.size(); ++i) {
      ffi::Any name, shape, dtype;
      if (auto m = specs[i].try_cast<ffi::Map<ffi::Any, ffi::Any>>()) {
        name = m->at(ffi::String("name"));
        shape = m->at(ffi::String("shape"));
        dtype = m->at(ffi::String("dtype"));
      } else {
        auto a = specs[i].cast<ffi::Array<ffi::Any>>();
        name = a[0], shape = a[1], dtype = a[2];
      }
      InputSpec& spec = inputs_[i];
      spec.name = name.cast<std::string>();  // the user's names, as the Python CompiledModel uses
      spec.shape.clear();
      for (const ffi::Any& d : shape.cast<ffi::Array<ffi::Any>>()) spec.shape.push_back(d.cast<int64_t>());
      spec.dtype = dtype.cast<std::string>();
    }
  } catch (const ffi::Error& e) {
    throw ModelError(json_path + ": unexpected input description: " + e.message());
  }
}

size_t Model::InputIndex(const std::string& name) const {
  std::string known;
  for (size_t i = 0; i < inputs_.size(); ++i) {
    if (inputs_[i].name == name) return i;
    known += (i ? ", " : "") + inputs_[i].name;
  }
  throw ModelError("the model has no input called '" + name + "' (inputs: " + known + ")");
}

std::vector<Tensor> Model::ToTensors(const std::vector<HostArray>& inputs) const {
  if (inputs.size() != inputs_.size()) {
    throw ModelError("the model takes " + std::to_string(inputs_.size()) + " inputs, got " +
                     std::to_string(inputs.size()));
  }
  std::vector<Tensor> tensors;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const HostArray& a = inputs[i];
    const InputSpec& spec = inputs_[i];
    if ((!spec.dtype.empty() && spec.dtype != a.dtype) ||
        (!spec.dtype.empty() && spec.shape != a.shape)) {
      throw ModelError("input '" + spec.name + "' must be " + ShapeText(spec.shape) + " " + spec.dtype +
                       ", got " + a.Describe());
    }
    if (a.data.size() != static_cast<size_t>(a.numel()) * HostArray::ItemSize(a.dtype)) {
      throw ModelError("input '" + spec.name + "': data size does not match " + a.Describe());
    }
    Tensor t = Tensor::FromNDAlloc(AlignedCPUAlloc(), ffi::Shape(a.shape), ToDLDataType(a.dtype),
                                   DLDevice{kDLCPU, 0});
    if (!a.data.empty()) std::memcpy(t.data_ptr(), a.data.data(), a.data.size());
    tensors.push_back(t);
  }
  return tensors;
}

HostArray Model::ToHost(const Tensor& tensor) {
  HostArray a;
  a.shape.assign(tensor.shape().begin(), tensor.shape().end());
  a.dtype = std::string(ffi::DLDataTypeToString(tensor.dtype()));
  a.data.resize(static_cast<size_t>(a.numel()) * HostArray::ItemSize(a.dtype));
  if (tensor.device().device_type != kDLCPU || !tensor.IsContiguous()) {
    throw ModelError("an output is not a contiguous CPU tensor");
  }
  if (!a.data.empty()) {
    std::memcpy(a.data.data(), static_cast<const char*>(tensor.data_ptr()) + tensor.byte_offset(), a.data.size());
  }
  return a;
}

std::vector<Tensor> Model::RunTensors(const std::vector<Tensor>& inputs) {
  std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
  ffi::Any result;
  try {
    main_.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
  } catch (const ffi::Error& e) {
    throw ModelError(path_ + ": main failed: " + e.kind() + ": " + e.message());
  }
  std::vector<Tensor> outputs;
  FlattenOutputs(result, &outputs);
  return outputs;
}

std::vector<HostArray> Model::Run(const std::vector<HostArray>& inputs) {
  std::vector<HostArray> outputs;
  for (const Tensor& t : RunTensors(ToTensors(inputs))) outputs.push_back(ToHost(t));
  return outputs;
}

std::vector<double> Model::Time(const std::vector<HostArray>& inputs, int repeat, int warmup) {
  std::vector<Tensor> tensors = ToTensors(inputs);
  for (int i = 0; i < warmup; ++i) RunTensors(tensors);
  std::vector<double> ms;
  for (int i = 0; i < repeat; ++i) {
    auto start = std::chrono::steady_clock::now();
    RunTensors(tensors);
    auto stop = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
  }
  return ms;
}

}  // namespace relayq
