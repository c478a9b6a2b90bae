#!/usr/bin/env bash
# Build (once) what `compress export --format gguf` and `compress verify --engine llamacpp` run: llama.cpp's
# own converter, quantizer and importance-matrix tool, all from one pinned llama-cpp-python sdist.
#
#   bash scripts/gguf-env.sh [DIR]      # default DIR: $COMPRESS_GGUF_ENV, else ../shared-cache/envs/llamacpp-<ver>
#   export COMPRESS_GGUF_ENV="$(bash scripts/gguf-env.sh)"
#
# DIR receives: wheels/ (the llama-cpp-python wheel built from the sdist: libllama with llama_model_quantize),
# converter/ (the sdist's vendor/llama.cpp/convert_hf_to_gguf.py with its conversion/ package and gguf-py/),
# bin/llama-imatrix with lib/ (tools/imatrix of the same sdist, linked against that build's libraries: one
# compile of llama.cpp for both; run it with LD_LIBRARY_PATH=DIR/lib, as compress does), and a stamp file written last. Each step keeps what an interrupted call
# finished. Then it installs the wheel and sentencepiece (the converter imports it even for BPE tokenizers)
# into the python on PATH (or $PYTHON) unless they are there at the pinned versions. A second call builds
# and installs nothing. Prints DIR on stdout; everything else goes to stderr. The first call compiles
# llama.cpp once (about 10 minutes on 2 free cores).
set -euo pipefail
LLAMA_CPP_PYTHON_VERSION="0.3.36"
SENTENCEPIECE_VERSION="0.2.3"
CMAKE_FLAGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
STAMP_TEXT="llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION} cmake:${CMAKE_FLAGS} imatrix converter v2"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${1:-${COMPRESS_GGUF_ENV:-$HERE/../shared-cache/envs/llamacpp-${LLAMA_CPP_PYTHON_VERSION}}}"
DIR="$(realpath -m "$DIR")"
STAMP="$DIR/.compress-stamp"
PY="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"
SDIST="$DIR/src/llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION}"
BUILD="$DIR/src/build"  # the wheel's CMake build folder, kept for the imatrix target

if ! [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]]; then
    echo "building the llama.cpp environment in $DIR (one time)" >&2
    if [[ -e "$DIR" && ! -f "$DIR/.compress-building" && -n "$(ls -A "$DIR" 2>/dev/null)" ]]; then
        echo "error: $DIR exists and was not made by this script; choose another folder (argument or COMPRESS_GGUF_ENV)" >&2
        exit 2
    fi
    rm -f "$STAMP"
    mkdir -p "$DIR/src" "$DIR/wheels" "$DIR/bin" "$DIR/lib"
    touch "$DIR/.compress-building"
    if [[ ! -f "$SDIST/pyproject.toml" ]]; then
        "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
            "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" -d "$DIR/src" >&2
        tar xzf "$DIR/src/llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION}.tar.gz" -C "$DIR/src"
    fi
    LL="$SDIST/vendor/llama.cpp"
    # the converter: the script, its conversion/ package and gguf-py/, from the same llama.cpp commit
    if [[ ! -f "$DIR/converter/convert_hf_to_gguf.py" ]]; then
        rm -rf "$DIR/converter" && mkdir -p "$DIR/converter"
        cp -r "$LL/convert_hf_to_gguf.py" "$LL/conversion" "$LL/gguf-py" "$DIR/converter/"
    fi
    # the bindings as a wheel; its build folder is kept
    if ! ls "$DIR"/wheels/llama_cpp_python-*.whl >/dev/null 2>&1; then
        CMAKE_ARGS="$CMAKE_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" "$PY" -m pip wheel -q --disable-pip-version-check \
            --no-deps "$SDIST" -w "$DIR/wheels" -C build-dir="$BUILD" >&2
    fi
    # llama.cpp's importance-matrix tool: the same build with tools on, only that target (its libraries are
    # already built, so this compiles imatrix.cpp alone)
    if [[ ! -x "$DIR/bin/llama-imatrix" ]]; then
        cmake -S "$SDIST" -B "$BUILD" -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF >&2
        cmake --build "$BUILD" --target llama-imatrix -j "$JOBS" >&2
        find "$BUILD" -name "*.so*" \( -type f -o -type l \) -exec cp -a {} "$DIR/lib/" \;
        cp "$BUILD/vendor/llama.cpp/bin/llama-imatrix" "$DIR/bin/" 2>/dev/null || cp "$BUILD/bin/llama-imatrix" "$DIR/bin/"
    fi
    LD_LIBRARY_PATH="$DIR/lib" "$DIR/bin/llama-imatrix" --help >/dev/null 2>&1 || {
        echo "error: $DIR/bin/llama-imatrix does not run" >&2; exit 3; }
    rm -rf "$DIR/src"
    rm -f "$DIR/.compress-building"
    echo "$STAMP_TEXT" > "$STAMP"
fi

# install into the current python only what is missing
if ! "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '${LLAMA_CPP_PYTHON_VERSION}')" 2>/dev/null; then
    "$PY" -m pip install -q --disable-pip-version-check "$DIR"/wheels/llama_cpp_python-*.whl >&2
fi
if ! "$PY" -c "import sentencepiece, sys; sys.exit(sentencepiece.__version__ != '${SENTENCEPIECE_VERSION}')" 2>/dev/null; then
    "$PY" -m pip install -q --disable-pip-version-check "sentencepiece==${SENTENCEPIECE_VERSION}" >&2
fi
echo "$DIR"
