/* Brings a bench image into the page cache one 4 KiB page at a time (see scripts/bench-fuse.ts).
 *
 * Why not `cat`: on ext4 with large folios (Linux >= 6.16) sequential reads and large writes cache a
 * file in folios of up to 2 MiB, and every 4 KiB buffered write into such a folio walks all of its
 * buffer heads (ext4_block_write_begin: half of a daemon's CPU at 4 KiB random writes, measured).
 * A guest disk whose cache its own random I/O brought in is held in 4 KiB folios; this tool gives
 * the bench image that state. POSIX_FADV_RANDOM turns readahead off, so each pread caches one page.
 *
 * usage: page-warm [--drop] FILE
 *   --drop  first write back and drop the file's cached pages (whatever their folio size)
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int drop = argc == 3 && strcmp(argv[1], "--drop") == 0;
    if (argc != 2 + drop) {
        fprintf(stderr, "usage: page-warm [--drop] FILE\n");
        return 2;
    }
    const char *file = argv[1 + drop];
    int fd = open(file, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        perror(file);
        return 1;
    }
    if (drop && (fdatasync(fd) < 0 || posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) != 0)) {
        perror("drop");
        return 1;
    }
    if (posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM) != 0) {
        perror("fadvise");
        return 1;
    }
    static char page[4096];
    for (off_t off = 0; off < st.st_size; off += sizeof(page)) {
        if (pread(fd, page, sizeof(page), off) < 0) {
            perror("pread");
            return 1;
        }
    }
    close(fd);
    return 0;
}
