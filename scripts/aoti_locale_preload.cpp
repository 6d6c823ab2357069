// Work-around for AOTInductor CUDA packages that segfault while loading (seen with torch 2.11.0+cu130, g++ 13.3).
// Their wrapper .so carries its own static copy of libstdc++ (no libstdc++.so.6 in NEEDED) and exports its
// symbols; AOTI's runtime builds a std::regex in parse_device_str() while the model is constructed, and the
// copy's facet lookup lands on the wrong facet (a codecvt member runs for collate<char>::transform): SIGSEGV,
// for any program, `x.sin() + 1` included. Loading this library first (RTLD_GLOBAL), itself linked with
// -static-libstdc++ and running that regex once, makes the packages load and run (measured on the H100). Our
// reading, not proven: the wrappers export their locale facet ids as STB_GNU_UNIQUE symbols, which then bind to
// this library's initialised ones.
//   g++ -shared -fPIC -O1 -static-libstdc++ -o aoti_locale_preload.so scripts/aoti_locale_preload.cpp
//   python scripts/run_with_preload.py aoti_locale_preload.so your_script.py ...
#include <regex>
#include <string>

__attribute__((constructor)) static void initialise_regex_locale() {
  std::regex device_pattern("(cpu|cuda|xpu|mps)(:([0-9]+))?");  // the pattern AOTI's parse_device_str builds
  std::smatch match;
  const std::string device("cuda");
  std::regex_match(device, match, device_pattern);
}
