// Runs one kernel case under the CPU emulation (see README.md). A case is a text file that
// model-manager/tests/cuda_emu.rs writes from the launch plans of `kernels::launch`:
//
//   buffer NAME ELEM_BYTES COUNT zero|poison|PATH   device memory (exactly that size), its start
//   launch KERNEL GX GY GZ BX BY BZ SHARED_BYTES     then one `arg` line per parameter:
//   arg ptr NAME OFFSET | arg i32 V | arg i64 V | arg u64 V | arg f32 HEXBITS
//   run                                              launches it (launches run in file order)
//   save NAME FILE                                   writes a buffer to OUT/FILE after every launch
//
// Usage: jhakaas-cuda-emu [--order forward|reverse|random] [--seed N] [--out OUT] CASE
// Exits 0 when every launch ran; 3 with a message on a bad case, a bad launch (argument types
// against the kernel's signature, CUDA's limits), a deadlock or a diverged warp.
#include <stdio.h>
#include <stdlib.h>

#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "runtime.h"

using namespace jhakaas_emu;

namespace {

struct Buffer {
  size_t elem_bytes = 0, count = 0;
  char* data = nullptr;  // malloc'd at exactly elem_bytes * count, so ASan sees every overrun
};

struct Arg {
  char kind;  // 'p', 'i', 'f'
  size_t bytes;
  size_t pointee;
  alignas(8) unsigned char value[8];
};

void check_args(const Kernel& k, const std::vector<Arg>& args) {
  if (args.size() != k.arity)
    fail("%s takes %zu arguments, the launch passes %zu", k.name, k.arity, args.size());
  for (size_t i = 0; i < args.size(); ++i) {
    const ParamType& p = k.params[i];
    const Arg& a = args[i];
    if (p.kind != a.kind || p.bytes != a.bytes || p.pointee != a.pointee)
      fail("%s: argument %zu is %c%zu (element %zu bytes), the kernel takes %c%zu (element %zu "
           "bytes)",
           k.name, i, a.kind, a.bytes, a.pointee, p.kind, p.bytes, p.pointee);
  }
}

Buffer make_buffer(size_t elem_bytes, size_t count, const std::string& fill) {
  Buffer b{elem_bytes, count, nullptr};
  const size_t bytes = elem_bytes * count;
  b.data = static_cast<char*>(malloc(bytes ? bytes : 1));
  if (fill == "zero") {
    memset(b.data, 0, bytes);
  } else if (fill == "poison") {
    memset(b.data, 0xff, bytes);  // NaN in f32, f16 and bf16: unwritten output shows
  } else {
    std::ifstream in(fill, std::ios::binary);
    if (!in.read(b.data, (std::streamsize)bytes)) fail("cannot read %zu bytes from %s", bytes, fill.c_str());
  }
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  LaunchOptions options;
  const char* case_path = nullptr;
  std::string out_dir = ".";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--order" && i + 1 < argc) {
      std::string o = argv[++i];
      if (o == "forward") options.order = Order::Forward;
      else if (o == "reverse") options.order = Order::Reverse;
      else if (o == "random") options.order = Order::Random;
      else fail("--order takes forward, reverse or random, not %s", o.c_str());
    } else if (a == "--seed" && i + 1 < argc) {
      options.seed = strtoull(argv[++i], nullptr, 10);
    } else if (a == "--out" && i + 1 < argc) {
      out_dir = argv[++i];
    } else if (!case_path) {
      case_path = argv[i];
    } else {
      fail("usage: jhakaas-cuda-emu [--order forward|reverse|random] [--seed N] [--out OUT] CASE");
    }
  }
  if (!case_path) fail("usage: jhakaas-cuda-emu [--order forward|reverse|random] [--seed N] [--out OUT] CASE");
  std::ifstream file(case_path);
  if (!file) fail("cannot open %s", case_path);

  std::map<std::string, Buffer> buffers;
  std::vector<std::pair<std::string, std::string>> saves;
  const Kernel* kernel = nullptr;
  dim3 grid, block;
  std::vector<Arg> args;
  std::string line;
  int number = 0;
  while (std::getline(file, line)) {
    ++number;
    std::istringstream in(line);
    std::string word;
    if (!(in >> word) || word[0] == '#') continue;
    if (word == "buffer") {
      std::string name, fill;
      size_t elem = 0, count = 0;
      if (!(in >> name >> elem >> count >> fill)) fail("%s:%d: bad buffer line", case_path, number);
      buffers[name] = make_buffer(elem, count, fill);
    } else if (word == "launch") {
      std::string name;
      unsigned shared = 0;
      if (!(in >> name >> grid.x >> grid.y >> grid.z >> block.x >> block.y >> block.z >> shared))
        fail("%s:%d: bad launch line", case_path, number);
      kernel = find_kernel(name.c_str());
      if (!kernel) fail("%s:%d: no kernel named %s", case_path, number, name.c_str());
      if (shared != 0) fail("%s: dynamic shared memory is not emulated", name.c_str());
      args.clear();
    } else if (word == "arg") {
      std::string kind;
      in >> kind;
      Arg a{};
      if (kind == "ptr") {
        std::string name;
        size_t offset = 0;
        if (!(in >> name >> offset)) fail("%s:%d: bad ptr argument", case_path, number);
        auto it = buffers.find(name);
        if (it == buffers.end()) fail("%s:%d: no buffer %s", case_path, number, name.c_str());
        if (offset > it->second.count) fail("%s:%d: offset past %s", case_path, number, name.c_str());
        void* p = it->second.data + offset * it->second.elem_bytes;
        a = Arg{'p', sizeof p, it->second.elem_bytes, {}};
        memcpy(a.value, &p, sizeof p);
      } else if (kind == "i32") {
        int32_t v;
        in >> v;
        a = Arg{'i', 4, 0, {}};
        memcpy(a.value, &v, 4);
      } else if (kind == "i64") {
        int64_t v;
        in >> v;
        a = Arg{'i', 8, 0, {}};
        memcpy(a.value, &v, 8);
      } else if (kind == "u64") {
        uint64_t v;
        in >> v;
        a = Arg{'i', 8, 0, {}};
        memcpy(a.value, &v, 8);
      } else if (kind == "f32") {
        uint32_t bits;
        in >> std::hex >> bits;
        a = Arg{'f', 4, 0, {}};
        memcpy(a.value, &bits, 4);
      } else {
        fail("%s:%d: unknown argument kind %s", case_path, number, kind.c_str());
      }
      if (in.fail()) fail("%s:%d: bad %s argument", case_path, number, kind.c_str());
      args.push_back(a);
    } else if (word == "run") {
      if (!kernel) fail("%s:%d: run without a launch", case_path, number);
      check_args(*kernel, args);
      std::vector<void*> params;
      for (Arg& a : args) params.push_back(a.value);
      launch(*kernel, grid, block, params.data(), options);
    } else if (word == "save") {
      std::string name, path;
      if (!(in >> name >> path)) fail("%s:%d: bad save line", case_path, number);
      if (!buffers.count(name)) fail("%s:%d: no buffer %s", case_path, number, name.c_str());
      saves.emplace_back(name, path);
    } else {
      fail("%s:%d: unknown line `%s`", case_path, number, word.c_str());
    }
  }
  for (const auto& s : saves) {
    const Buffer& b = buffers[s.first];
    const std::string path = out_dir + "/" + s.second;
    std::ofstream out(path, std::ios::binary);
    if (!out.write(b.data, (std::streamsize)(b.elem_bytes * b.count)))
      fail("cannot write %s", path.c_str());
  }
  for (auto& b : buffers) free(b.second.data);
  return 0;
}
