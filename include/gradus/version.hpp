#pragma once

#define GRADUS_VERSION_MAJOR 0
#define GRADUS_VERSION_MINOR 1
#define GRADUS_VERSION_PATCH 0

namespace gradus {
inline constexpr int version_major = GRADUS_VERSION_MAJOR;
inline constexpr int version_minor = GRADUS_VERSION_MINOR;
inline constexpr int version_patch = GRADUS_VERSION_PATCH;
}  // namespace gradus
