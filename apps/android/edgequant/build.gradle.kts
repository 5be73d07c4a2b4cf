// The edgequant Android library module: Kotlin EdgequantEngine over a JNI library built by the NDK from
// src/main/cpp/CMakeLists.txt (apps/runtime + the exported model + the TVM runtime with OpenCL). See ../README.md.
plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "ai.edgequant"
    compileSdk = 34
    defaultConfig {
        minSdk = 26
        ndk { abiFilters += listOf("arm64-v8a") }
        externalNativeBuild {
            cmake {
                // paths of the model library and the TVM runtime built for arm64-v8a (README, steps 1-2)
                arguments += listOf(
                    "-DEDGEQUANT_MODEL_LIB=${project.property("edgequant.modelLib")}",
                    "-DTVM_ROOT=${project.property("edgequant.tvmRoot")}",
                    "-DTVM_FFI_ROOT=${project.property("edgequant.tvmFfiRoot")}",
                    "-DTVM_RUNTIME_LIB=${project.property("edgequant.tvmRuntimeLib")}",
                    "-DTVM_FFI_LIB=${project.property("edgequant.tvmFfiLib")}",
                    "-DANDROID_STL=c++_shared")
            }
        }
    }
    externalNativeBuild { cmake { path = file("src/main/cpp/CMakeLists.txt"); version = "3.22.1" } }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}

dependencies {
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.8.1")
}
