// swift-tools-version:5.9
// Swift package of the iOS recipe: `Edgequant` (EdgequantEngine: async token stream, cancel, memory numbers) over
// apps/runtime's C API, which comes with the model libraries and the TVM runtime in EdgequantRuntime.xcframework
// (made by scripts/make_xcframework.sh). See README.md for what was and was not built.
import PackageDescription

let package = Package(
    name: "Edgequant",
    platforms: [.iOS(.v16), .macOS(.v13)],
    products: [.library(name: "Edgequant", targets: ["Edgequant"])],
    targets: [
        .binaryTarget(name: "EdgequantRuntime", path: "EdgequantRuntime.xcframework"),
        .target(
            name: "Edgequant",
            dependencies: ["EdgequantRuntime"],
            linkerSettings: [
                .linkedFramework("Metal"),
                .linkedFramework("Foundation"),
                .linkedLibrary("c++"),
                // the model libraries register themselves from static initializers that nothing references:
                // without -all_load the linker drops them and edgequant_open cannot find the system library
                .unsafeFlags(["-Xlinker", "-all_load"]),
            ]),
    ])
