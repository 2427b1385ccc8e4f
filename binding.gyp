{
  "targets": [
    {
      "target_name": "qsd_native",
      "sources": ["native/addon.cc", "native/fuse_device.cc", "native/block_io.cc", "native/fuse_uring.cc", "native/loop_ring.cc", "native/thread_affinity.cc", "native/loop_poll.cc"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")", "native"],
      "defines": ["NAPI_VERSION=9", "NODE_ADDON_API_DISABLE_CPP_EXCEPTIONS", "_GNU_SOURCE"],
      "cflags_cc": ["-O2", "-std=c++17", "-Wall", "-Wno-unused-parameter"],
      "libraries": ["-luring"]
    }
  ]
}
