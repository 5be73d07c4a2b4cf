// Minimal demo app: opens the DIST copied into the app's files and streams greedy tokens into a TextView.
plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "ai.edgequant.demo"
    compileSdk = 34
    defaultConfig {
        applicationId = "ai.edgequant.demo"
        minSdk = 26
        targetSdk = 34
        ndk { abiFilters += listOf("arm64-v8a") }
        buildConfigField("String", "SYSTEM_LIB_PREFIX", "\"${project.property("edgequant.systemLibPrefix")}\"")
    }
    buildFeatures { buildConfig = true }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}

dependencies {
    implementation(project(":edgequant"))
    implementation("androidx.appcompat:appcompat:1.7.0")
    implementation("androidx.lifecycle:lifecycle-runtime-ktx:2.8.4")
}
