#pragma once
// Publishing a file so that a crash (kill -9, power loss) at any moment leaves either the old file
// or the complete new one: the bytes go to `temp` (in the same folder), are fsynced, renamed over
// `path`, and the folder is fsynced so the rename itself is on disk.
#include <cstddef>
#include <string>

namespace tessera {

// temp: the temporary name (default: path + ".partial"; a fixed name, so a run that was killed
// before its rename leaves nothing a rerun does not overwrite). Error naming path on any failure
// (the temporary file is removed).
void write_file_atomic(const std::string& path, const void* data, size_t size, const std::string& temp = "");

}  // namespace tessera
