#!/usr/bin/perl
# vzdump of a VM without disks, re-enacted for the vma-rs test suite: the one backup that
# Proxmox VE writes with the `vma` command itself (VMs with disks are written by
# Proxmox's patched QEMU). Written from reading pve-manager PVE/VZDump.pm (compressor_info,
# the archive naming in exec_backup_task) and qemu-server src/PVE/VZDump/QemuServer.pm
# (assemble, archive_vma's diskless branch); no code is copied.
#
# Usage:
#   diskless-backup.pl --vma PATH --conf FILE [--fw FILE] --tmpdir DIR
#                      (--dumpdir DIR | --stdout) [--compress 0|lzo|gzip|zstd] [--zstd N] VMID
#
#   --vma PATH     stands for /usr/bin/vma, which vzdump calls by absolute path
#   --conf FILE    stands for /etc/pve/qemu-server/VMID.conf
#   --fw FILE      stands for /etc/pve/firewall/VMID.fw (used if it exists)
#   --tmpdir DIR   the backup task's temporary directory (must exist)
#   --dumpdir DIR  where the archive goes: DIR/vzdump-qemu-VMID-YYYY_MM_DD-HH_MM_SS.vma[.EXT],
#                  written as ....vma.dat first and renamed when complete
#   --stdout       vzdump --stdout: the archive goes to standard output instead
#   --compress     vzdump's compress option (default zstd); --zstd its zstd thread count
#                  (default 1)
#
# Log lines ("INFO: ...", and everything vma prints) go to standard error.

use strict;
use warnings;

use File::Copy ();
use FindBin;
use Getopt::Long qw(GetOptions);
use IO::File;
use POSIX qw(strftime);

use lib $FindBin::Bin;
use PVECmd qw(run_command);

my %opts = (compress => 'zstd', zstd => 1);
GetOptions(\%opts, 'vma=s', 'conf=s', 'fw=s', 'tmpdir=s', 'dumpdir=s', 'stdout', 'compress=s', 'zstd=i')
    or die "bad options\n";
die "usage: diskless-backup.pl --vma PATH --conf FILE [--fw FILE] --tmpdir DIR (--dumpdir DIR | --stdout) VMID\n"
    if @ARGV != 1 || !$opts{vma} || !$opts{conf} || !$opts{tmpdir} || !($opts{dumpdir} || $opts{stdout});
my ($vmid) = @ARGV;

# vzdump's own stdout carries the archive in --stdout mode; its log goes to stderr.
my $archive_out;
if ($opts{stdout}) {
    open($archive_out, '>&', \*STDOUT) or die "unable to dup stdout - $!\n";
    open(STDOUT, '>&', \*STDERR) or die "unable to redirect stdout - $!\n";
}

sub loginfo { print STDERR "INFO: $_[0]\n"; }

# pve-manager VZDump.pm:compressor_info: the compressor command and the file extension.
sub compressor_info {
    my $c = $opts{compress};
    return undef if !$c || $c eq '0';
    return ('lzop', 'lzo') if $c eq '1' || $c eq 'lzo';
    return ('gzip --rsyncable', 'gz') if $c eq 'gzip';
    return ("zstd --threads=$opts{zstd}", 'zst') if $c eq 'zstd';
    die "internal error - unknown compression option '$c'";
}

# qemu-server VZDump/QemuServer.pm:assemble: the config vzdump stores, without
# snapshots, pending changes, special sections, unused disks, lock: and parent:; then
# one #qmdump#map line per disk (none here); the firewall config beside it.
sub assemble {
    my ($tmpdir) = @_;
    my $outfd = IO::File->new(">$tmpdir/qemu-server.conf")
        or die "unable to open '$tmpdir/qemu-server.conf' - $!\n";
    my $conffd = IO::File->new($opts{conf}, 'r') or die "unable to open '$opts{conf}' - $!\n";
    my ($found_snapshot, $found_pending, $found_special);
    while (defined(my $line = <$conffd>)) {
        next if $line =~ m/^\#vzdump\#/;
        next if $line =~ m/^\#qmdump\#/;
        if ($line =~ m/^\[(.*)\]\s*$/) {
            if ($1 =~ m/^PENDING$/i) {
                $found_pending = 1;
            } elsif ($1 =~ m/^special:.*$/) {
                $found_special = 1;
            } else {
                $found_snapshot = 1;
            }
        }
        next if $found_snapshot || $found_pending || $found_special;
        if ($line =~ m/^unused\d+:\s*(\S+)\s*/) {
            loginfo("skip unused drive '$1' (not included into backup)");
            next;
        }
        next if $line =~ m/^lock:/ || $line =~ m/^parent:/;
        print $outfd $line;
    }
    close($outfd) or die "close failed - $!\n";
    loginfo("snapshots found (not included into backup)") if $found_snapshot;
    loginfo("pending configuration changes found (not included into backup)") if $found_pending;
    File::Copy::copy($opts{fw}, "$tmpdir/qemu-server.fw") or die "copy failed - $!\n"
        if $opts{fw} && -f $opts{fw};
}

# qemu-server VZDump/QemuServer.pm:archive_vma, the branch for a VM without disks:
# `vma create` itself writes the archive into the shell command given as `exec:CMD`.
sub archive_vma_diskless {
    my ($tmpdir, $filename, $comp) = @_;
    my $conffile = "$tmpdir/qemu-server.conf";
    my $firewall = "$tmpdir/qemu-server.fw";
    loginfo("backup contains no disks");
    my $outcmd = $comp ? "exec:$comp" : "exec:cat";
    $outcmd .= " > $filename" if !$opts{stdout};
    my $cmd = [$opts{vma}, 'create', '-v', '-c', $conffile];
    push @$cmd, '-c', $firewall if -e $firewall;
    push @$cmd, $outcmd;
    loginfo("starting diskless backup");
    loginfo(join(' ', @$cmd));
    # PVE::VZDump::Plugin::cmd: run_command with every output line logged.
    my $logfunc = sub { loginfo($_[0]) };
    if ($opts{stdout}) {
        run_command($cmd, output => '>&' . fileno($archive_out), logfunc => $logfunc);
    } else {
        run_command($cmd, logfunc => $logfunc);
    }
}

# pve-manager VZDump.pm:exec_backup_task, the parts around the archive: its name, the
# .dat name it is written under, and the rename once it is complete.
my ($comp, $comp_ext) = compressor_info();
my $basename = "vzdump-qemu-$vmid-" . strftime("%Y_%m_%d-%H_%M_%S", localtime());
my $ext = '.vma';
$ext .= ".$comp_ext" if $comp && $comp_ext;
my ($target, $tmptar);
if (!$opts{stdout}) {
    $target = $tmptar = "$opts{dumpdir}/$basename$ext";
    $tmptar =~ s/\.[^\.]+$/\.dat/;
    unlink $tmptar;
}

assemble($opts{tmpdir});
if ($opts{stdout}) {
    loginfo("sending archive to stdout");
    archive_vma_diskless($opts{tmpdir}, $tmptar, $comp);
    exit 0;
}
loginfo("creating vzdump archive '$target'");
archive_vma_diskless($opts{tmpdir}, $tmptar, $comp);
rename($tmptar, $target) || die "unable to rename '$tmptar' to '$target'\n";
loginfo("archive file size: " . (-s $target));
