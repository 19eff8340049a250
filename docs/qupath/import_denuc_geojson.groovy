/*
 * Import DeNuC GeoJSON results into every matching image of the open QuPath project.
 *
 * For each image of the project, looks in GEOJSON_DIR for "<image name without extension>.geojson"
 * (or ".geojson.gz", or ".json") as written by `denuc-predict`, reads the objects with QuPath's
 * own GeoJSON reader (PathIO) and adds them to the image's hierarchy, then saves the image data.
 *
 * Run it from Automate > Script editor (File > Open... this file, set GEOJSON_DIR, then Run).
 * Plain Groovy on QuPath's public API (qupath.lib.io.PathIO, QuPath >= 0.4).
 * NOT TESTED: no QuPath was available where this script was written; check it on a copy of a
 * project first.
 */
import java.nio.file.Files
import java.nio.file.Path
import java.nio.file.Paths
import java.util.zip.GZIPInputStream

import qupath.lib.common.GeneralTools
import qupath.lib.io.PathIO

// ---- settings -------------------------------------------------------------------------------
def GEOJSON_DIR = "/path/to/denuc/output"   // the folder denuc-predict wrote to
def REPLACE_DETECTIONS = false              // true: remove each image's detections before importing
// ----------------------------------------------------------------------------------------------

def project = getProject()
if (project == null) {
    println "Open a project first (File > Project > Open project)."
    return
}

Path findFile(String dir, String stem) {
    for (suffix in [".geojson", ".geojson.gz", ".json"]) {
        def p = Paths.get(dir, stem + suffix)
        if (Files.isRegularFile(p))
            return p
    }
    return null
}

List readObjects(Path path) {
    if (path.getFileName().toString().toLowerCase().endsWith(".gz")) {
        // PathIO.readObjects knows .geojson/.json/.zip; decompress .gz ourselves
        def stream = new GZIPInputStream(Files.newInputStream(path))
        try {
            return PathIO.readObjectsFromGeoJSON(stream)
        } finally {
            stream.close()
        }
    }
    return PathIO.readObjects(path)
}

int nImages = 0
int nObjects = 0
for (entry in project.getImageList()) {
    def stem = GeneralTools.getNameWithoutExtension(entry.getImageName())
    def file = findFile(GEOJSON_DIR, stem)
    if (file == null) {
        println "${entry.getImageName()}: no ${stem}.geojson in ${GEOJSON_DIR}, skipped"
        continue
    }
    def objects = readObjects(file)
    def imageData = entry.readImageData()
    def hierarchy = imageData.getHierarchy()
    if (REPLACE_DETECTIONS)
        hierarchy.removeObjects(hierarchy.getDetectionObjects(), true)
    hierarchy.addObjects(objects)
    entry.saveImageData(imageData)
    println "${entry.getImageName()}: imported ${objects.size()} objects from ${file.getFileName()}"
    nImages++
    nObjects += objects.size()
}
println "Done: ${nObjects} objects into ${nImages} image(s). Reopen an image to see them."
