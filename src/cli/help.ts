// --help and --version texts (QEMU's layout; our program name and export types).
import { PACKAGE_VERSION, QEMU_VERSION } from '../version.js';

export function versionText(program: string): string {
  const { major, minor, micro } = QEMU_VERSION;
  return `${program} version ${PACKAGE_VERSION} (qemu-storage-daemon ${major}.${minor}.${micro} compatible)\n` +
    'A QEMU-compatible storage daemon written in TypeScript\n';
}

export function helpText(program: string): string {
  return `Usage: ${program} [options]
QEMU storage daemon (qsd-ts)

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend

  --chardev <options>    configure a character device backend
                         (socket,id=<id>,path=<path>,server=on,wait=off or stdio,id=<id>)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --export [type=]fuse,id=<id>,node-name=<node-name>,mountpoint=<file>
           [,growable=on|off][,writable=on|off][,allow-other=on|off|auto]
           [,iothread=<id>|iothread.0=<id>,iothread.1=<id>...]
           [,io-uring=on|off]
                         export the specified block node over FUSE

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --object help          list object types that can be added
  --object <type>,help   list properties for the given object type
  --object <type>[,<property>=<value>...]
                         create a new object of type <type>, setting
                         properties in the order they are specified. Note
                         that the 'id' property must be set.
                         qsd-ts has 'iothread': an event loop of its own
                         (a worker thread) that exports can run in.

  --pidfile <path>       write process ID to a file after startup

Environment: QSD_TS_LOG=debug|trace enables structured debug logs on stderr.
`;
}
