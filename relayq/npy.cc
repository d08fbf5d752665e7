// relayq/npy.cc: the .npy format is a magic string, a version, a header length, a Python dict
// literal {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } padded with spaces to a
// 64-byte boundary, then the raw data.
#include "npy.h"

#include <cctype>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

namespace relayq {

namespace {

const char kMagic[] = "\x93NUMPY";
const size_t kMagicLen = 6;

// NumPy's type code (without the byte-order character) and our dtype names.
const std::pair<const char*, const char*> kTypes[] = {
    {"b1", "bool"},    {"i1", "int8"},     {"u1", "uint8"},   {"i2", "int16"},
    {"u2", "uint16"},  {"i4", "int32"},    {"u4", "uint32"},  {"i8", "int64"},
    {"u8", "uint64"},  {"f2", "float16"},  {"f4", "float32"}, {"f8", "float64"},
};

bool HostIsLittleEndian() {
  const uint16_t one = 1;
  uint8_t first;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

// The text after `'key':` in the header dict, up to the next top-level comma or brace.
std::string DictValue(const std::string& header, const std::string& key, const std::string& path) {
  const std::string quoted[] = {"'" + key + "'", "\"" + key + "\""};
  size_t pos = std::string::npos;
  for (const auto& q : quoted) {
    pos = header.find(q);
    if (pos != std::string::npos) {
      pos += q.size();
      break;
    }
  }
  if (pos == std::string::npos) throw NpyError(path + ": .npy header has no '" + key + "' entry");
  pos = header.find(':', pos);
  if (pos == std::string::npos) throw NpyError(path + ": malformed .npy header");
  ++pos;
  while (pos < header.size() && std::isspace(static_cast<unsigned char>(header[pos]))) ++pos;
  size_t end = pos;
  if (pos < header.size() && header[pos] == '(') {
    end = header.find(')', pos);
    if (end == std::string::npos) throw NpyError(path + ": malformed shape in .npy header");
    return header.substr(pos, end - pos + 1);
  }
  while (end < header.size() && header[end] != ',' && header[end] != '}') ++end;
  std::string v = header.substr(pos, end - pos);
  while (!v.empty() && std::isspace(static_cast<unsigned char>(v.back()))) v.pop_back();
  return v;
}

}  // namespace

int64_t HostArray::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

size_t HostArray::ItemSize(const std::string& dtype) {
  for (const auto& t : kTypes) {
    if (dtype == t.second) return static_cast<size_t>(std::stoi(t.first + 1));
  }
  throw NpyError("unsupported dtype " + dtype);
}

std::string HostArray::Describe() const {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) os << ",";
  os << ") " << dtype;
  return os.str();
}

HostArray ReadNpy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw NpyError(path + ": cannot open file");
  char magic[kMagicLen + 2];
  if (!f.read(magic, sizeof(magic)) || std::memcmp(magic, kMagic, kMagicLen) != 0) {
    throw NpyError(path + ": not a .npy file (bad magic string)");
  }
  const int major = static_cast<unsigned char>(magic[kMagicLen]);
  uint32_t header_len = 0;
  if (major == 1) {
    unsigned char b[2];
    if (!f.read(reinterpret_cast<char*>(b), 2)) throw NpyError(path + ": truncated .npy header");
    header_len = b[0] | (b[1] << 8);
  } else if (major == 2 || major == 3) {
    unsigned char b[4];
    if (!f.read(reinterpret_cast<char*>(b), 4)) throw NpyError(path + ": truncated .npy header");
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
  } else {
    throw NpyError(path + ": unsupported .npy format version " + std::to_string(major));
  }
  std::string header(header_len, '\0');
  if (!f.read(&header[0], header_len)) throw NpyError(path + ": truncated .npy header");

  HostArray a;
  std::string descr = DictValue(header, "descr", path);
  if (descr.size() < 2 || (descr.front() != '\'' && descr.front() != '"')) {
    throw NpyError(path + ": unsupported dtype " + descr + " (structured arrays are not supported)");
  }
  descr = descr.substr(1, descr.size() - 2);
  const char order = descr.empty() ? '?' : descr[0];
  const std::string code = descr.size() > 1 ? descr.substr(1) : "";
  for (const auto& t : kTypes) {
    if (code == t.first) a.dtype = t.second;
  }
  if (a.dtype.empty()) throw NpyError(path + ": unsupported dtype '" + descr + "'");
  const size_t item = HostArray::ItemSize(a.dtype);
  const bool native_order = order == '|' || order == '=' || (order == '<' && HostIsLittleEndian()) ||
                            (order == '>' && !HostIsLittleEndian());
  if (!native_order && item > 1) {
    throw NpyError(path + ": dtype '" + descr + "' has the wrong byte order for this machine");
  }
  if (DictValue(header, "fortran_order", path) != "False") {
    throw NpyError(path + ": Fortran-order arrays are not supported (save with np.ascontiguousarray)");
  }
  std::string shape = DictValue(header, "shape", path);
  if (shape.empty() || shape.front() != '(') throw NpyError(path + ": malformed shape " + shape);
  std::string num;
  for (char c : shape.substr(1)) {
    if (std::isdigit(static_cast<unsigned char>(c))) {
      num += c;
    } else if (c == ',' || c == ')') {
      if (!num.empty()) a.shape.push_back(std::stoll(num));
      num.clear();
    } else if (!std::isspace(static_cast<unsigned char>(c)) && c != 'L') {
      throw NpyError(path + ": malformed shape " + shape);
    }
  }
  const size_t nbytes = static_cast<size_t>(a.numel()) * item;
  a.data.resize(nbytes);
  if (nbytes && !f.read(reinterpret_cast<char*>(a.data.data()), nbytes)) {
    throw NpyError(path + ": truncated data: expected " + std::to_string(nbytes) + " bytes for " +
                   a.Describe());
  }
  return a;
}

void WriteNpy(const std::string& path, const HostArray& a) {
  const char* code = nullptr;
  for (const auto& t : kTypes) {
    if (a.dtype == t.second) code = t.first;
  }
  if (!code) throw NpyError(path + ": cannot write dtype " + a.dtype);
  if (a.data.size() != static_cast<size_t>(a.numel()) * HostArray::ItemSize(a.dtype)) {
    throw NpyError(path + ": data size does not match " + a.Describe());
  }
  const size_t item = HostArray::ItemSize(a.dtype);
  const char order = item == 1 ? '|' : (HostIsLittleEndian() ? '<' : '>');
  std::ostringstream h;
  h << "{'descr': '" << order << code << "', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < a.shape.size(); ++i) h << (i ? ", " : "") << a.shape[i];
  if (a.shape.size() == 1) h << ",";
  h << "), }";
  std::string header = h.str();
  // magic (6) + version (2) + length (2) + header, padded with spaces and a newline to 64 bytes.
  const size_t total = kMagicLen + 2 + 2 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream f(path, std::ios::binary);
  if (!f) throw NpyError(path + ": cannot open for writing");
  f.write(kMagic, kMagicLen);
  const char version[2] = {1, 0};
  f.write(version, 2);
  const unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                                static_cast<unsigned char>(header.size() >> 8)};
  f.write(reinterpret_cast<const char*>(len), 2);
  f.write(header.data(), header.size());
  f.write(reinterpret_cast<const char*>(a.data.data()), a.data.size());
  if (!f) throw NpyError(path + ": write failed");
}

}  // namespace relayq
