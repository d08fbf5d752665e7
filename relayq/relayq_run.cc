// relayq_run: run a model exported by relayq's CompiledModel.export on .npy inputs, without Python.
//
//   relayq_run model.so --input x.npy [--input name=y.npy ...] [--output-dir out/]
//              [--repeat N] [--warmup W] [--threads T]
//
// Writes out/output_0.npy, out/output_1.npy, ... (the outputs of main, tuples flattened), prints
// each output's shape and dtype, and the median latency of N runs. Exit status: 0 on success,
// 1 when the model or an input cannot be loaded or run, 2 on a usage error.
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "model.h"
#include "npy.h"

namespace {

const char kUsage[] =
    "usage: relayq_run MODEL.so --input X.npy [--input NAME=Y.npy ...] [--output-dir DIR]\n"
    "                  [--repeat N] [--warmup W] [--threads T]\n"
    "  --input       an input of main: inputs without NAME= are taken in order\n"
    "  --output-dir  where output_<i>.npy are written (default: no files)\n"
    "  --repeat      timed runs; the median latency is printed (default 10; 0: no timing)\n"
    "  --warmup      untimed runs before timing (default 1)\n"
    "  --threads     worker threads of TVM's thread pool (default: TVM_NUM_THREADS, else\n"
    "                OMP_NUM_THREADS, else TVM's default: half the logical cores on x86)\n";

struct UsageError {
  std::string message;
};

int ParseInt(const std::string& flag, const std::string& value, int min) {
  char* end = nullptr;
  long v = std::strtol(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || v < min) {
    throw UsageError{flag + " expects an integer >= " + std::to_string(min) + ", got '" + value + "'"};
  }
  return static_cast<int>(v);
}

struct Args {
  std::string model;
  std::vector<std::string> inputs;  // "path" or "name=path"
  std::string output_dir;
  int repeat = 10;
  int warmup = 1;
  int threads = -1;
};

Args Parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      size_t eq = arg.find('=');
      if (arg.rfind("--", 0) == 0 && eq != std::string::npos) return arg.substr(eq + 1);
      if (i + 1 >= argc) throw UsageError{arg + " needs a value"};
      return argv[++i];
    };
    std::string flag = arg.substr(0, arg.find('='));
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (flag == "--input" || flag == "-i") {
      a.inputs.push_back(value());
    } else if (flag == "--output-dir" || flag == "-o") {
      a.output_dir = value();
    } else if (flag == "--repeat") {
      a.repeat = ParseInt("--repeat", value(), 0);
    } else if (flag == "--warmup") {
      a.warmup = ParseInt("--warmup", value(), 0);
    } else if (flag == "--threads") {
      a.threads = ParseInt("--threads", value(), 0);
    } else if (arg.rfind("-", 0) == 0) {
      throw UsageError{"unknown option " + arg};
    } else if (a.model.empty()) {
      a.model = arg;
    } else {
      throw UsageError{"unexpected argument '" + arg + "' (inputs are given with --input)"};
    }
  }
  if (a.model.empty()) throw UsageError{"no model library given"};
  return a;
}

void MakeDirs(const std::string& dir) {
  for (size_t pos = 0; pos != std::string::npos;) {
    pos = dir.find('/', pos + 1);
    std::string part = dir.substr(0, pos);
    if (!part.empty() && mkdir(part.c_str(), 0777) != 0 && errno != EEXIST) {
      throw relayq::NpyError(part + ": cannot create directory");
    }
  }
}

std::vector<relayq::HostArray> ReadInputs(const relayq::Model& model, const std::vector<std::string>& specs) {
  const size_t n = model.inputs().size();
  std::vector<relayq::HostArray> arrays(n);
  std::vector<bool> given(n, false);
  std::vector<std::string> positional;
  for (const std::string& s : specs) {
    size_t eq = s.find('=');
    if (eq == std::string::npos) {
      positional.push_back(s);
      continue;
    }
    size_t idx = model.InputIndex(s.substr(0, eq));
    if (given[idx]) throw relayq::ModelError("input '" + s.substr(0, eq) + "' given twice");
    arrays[idx] = relayq::ReadNpy(s.substr(eq + 1));
    given[idx] = true;
  }
  size_t next = 0;
  for (const std::string& path : positional) {
    while (next < n && given[next]) ++next;
    if (next == n) {
      throw relayq::ModelError("too many inputs: the model takes " + std::to_string(n) + " (" + path +
                               " is one too many)");
    }
    arrays[next] = relayq::ReadNpy(path);
    given[next] = true;
  }
  for (size_t i = 0; i < n; ++i) {
    if (!given[i]) throw relayq::ModelError("missing input '" + model.inputs()[i].name + "' (use --input)");
  }
  return arrays;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  try {
    args = Parse(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "relayq_run: " << e.message << "\n" << kUsage;
    return 2;
  }
  try {
    // Before anything starts TVM's thread pool: it reads TVM_NUM_THREADS once.
    if (args.threads >= 0) relayq::SetNumThreads(args.threads);
    relayq::Model model(args.model);
    std::vector<relayq::HostArray> inputs = ReadInputs(model, args.inputs);
    std::vector<relayq::HostArray> outputs = model.Run(inputs);
    if (!args.output_dir.empty()) MakeDirs(args.output_dir);
    for (size_t i = 0; i < outputs.size(); ++i) {
      std::string line = "output " + std::to_string(i) + ": " + outputs[i].Describe();
      if (!args.output_dir.empty()) {
        std::string path = args.output_dir + "/output_" + std::to_string(i) + ".npy";
        relayq::WriteNpy(path, outputs[i]);
        line += " -> " + path;
      }
      std::cout << line << "\n";
    }
    if (args.repeat > 0) {
      std::vector<double> ms = model.Time(inputs, args.repeat, args.warmup);
      std::sort(ms.begin(), ms.end());
      double median = ms.size() % 2 ? ms[ms.size() / 2] : (ms[ms.size() / 2 - 1] + ms[ms.size() / 2]) / 2;
      std::printf("latency: median %.3f ms, min %.3f ms over %d runs, %d threads\n", median, ms.front(),
                  args.repeat, relayq::NumThreads());
    }
  } catch (const std::exception& e) {
    std::cerr << "relayq_run: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
