# Sourced by the scripts that make a models.toml for another classifier (decide_classifier.sh,
# gpu_attack.sh): the two edits, kept in one place so a manifest change is mended once.

# without_defended_classifier FILE: FILE without its [defended_classifier] table, if any.
without_defended_classifier() {
  awk '/^\[/ { skip = ($0 == "[defended_classifier]") } !skip' "$1"
}

# classifier_as NAME (a filter): the [classifier] table's file is NAME, and its int8_file,
# which belongs to the shipped classifier.onnx, is dropped.
classifier_as() {
  sed "s|^file = \"classifier.onnx\"|file = \"$1\"|; /^int8_file = \"classifier.int8.onnx\"/d"
}
