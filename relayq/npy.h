// relayq/npy.h: a small reader and writer of NumPy .npy files (format versions 1.0 to 3.0).
//
// Only what a model's inputs and outputs need: C order, little-endian (or byte-order-free)
// bool/int8/uint8/int16/uint16/int32/uint32/int64/uint64/float16/float32/float64 arrays.
// Errors are thrown as relayq::NpyError with the file name in the message.
#ifndef RELAYQ_NPY_H_
#define RELAYQ_NPY_H_

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace relayq {

class NpyError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/*! \brief A host array: shape, a NumPy dtype name ("int8", "float32", ...) and its raw C-order bytes. */
struct HostArray {
  std::vector<int64_t> shape;
  std::string dtype;
  std::vector<uint8_t> data;

  int64_t numel() const;
  /*! \brief Bytes per element of `dtype` (throws NpyError for an unknown dtype). */
  static size_t ItemSize(const std::string& dtype);
  /*! \brief "(1, 3, 8, 8) int8", for messages. */
  std::string Describe() const;
};

/*! \brief Read a .npy file. */
HostArray ReadNpy(const std::string& path);
/*! \brief Write a .npy file (version 1.0, C order, little-endian). */
void WriteNpy(const std::string& path, const HostArray& array);

}  // namespace relayq

#endif  // RELAYQ_NPY_H_
