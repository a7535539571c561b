function ckpt_quarantine(folder, name)
%CKPT_QUARANTINE  Move a checkpoint that failed its checks, and its marker, to corrupt/.
%   ckpt_quarantine('checkpoints', 'step_00000400.mat')   % to checkpoints/corrupt/
%   ckpt_load_latest calls it for every checkpoint it skips. The file stays for
%   inspection, out of the way of rotation, last.txt and later resumes, which would
%   otherwise check it again at every start. The file goes first and its marker last, as
%   in the Python and R kits: a kill in between leaves a marker whose file is missing,
%   which the next resume skips and moves in turn. A name already in corrupt/ is replaced.
  target = fullfile(folder, 'corrupt');
  if ~isfolder(target)
    mkdir(target);
  end
  for moved = {name, [name '.json']}
    source = fullfile(folder, moved{1});
    if exist(source, 'file')   % a file or a folder
      ckpt_rename(source, fullfile(target, moved{1}));
    end
  end
end

%% One test per kind of damage: the resume prints one line naming the file, moves it to
%% corrupt/ with its marker, and loads the next newest checkpoint.
%!function folder = saved_three ()
%! folder = tempname ();
%! for step = 1:3
%!   ckpt_save (folder, struct ('step', step, 'x', magic (4) + step), step);
%! end
%!endfunction

%!function expect_resume_from_2 (folder, printed, reason)
%! assert (! isempty (strfind (printed, ['skipped corrupt checkpoint: step_00000003.mat: ' reason])), printed);
%! assert (numel (regexp (printed, '[^\n]*step_00000003\.mat', 'match')), 1, printed);
%! assert (isfile (fullfile (folder, 'corrupt', 'step_00000003.mat.json')));
%! assert (! isfile (fullfile (folder, 'step_00000003.mat.json')));
%! assert ({ckpt_list(folder).name}, {'step_00000001.mat', 'step_00000002.mat'});
%! assert (ckpt_read_last_pointer (folder), 'step_00000002.mat');
%!endfunction

%!function rewrite_with_marker (path, bytes)
%! % new bytes under the name, and a marker that matches them: only load can tell
%! fid = fopen (path, 'w'); fwrite (fid, bytes); fclose (fid);
%! marker = jsondecode (fileread ([path '.json']));
%! marker.size = numel (bytes);
%! marker.sha256 = ckpt_sha256_file (path);
%! ckpt_write_text_atomic ([path '.json'], jsonencode (marker));
%!endfunction

%!function bytes = read_bytes (path)
%! fid = fopen (path); bytes = fread (fid, Inf, 'uint8=>uint8')'; fclose (fid);
%!endfunction

%!test
%! confirm_recursive_rmdir (false, 'local');
%! % truncated
%! folder = saved_three (); path = fullfile (folder, 'step_00000003.mat');
%! bytes = read_bytes (path);
%! fid = fopen (path, 'w'); fwrite (fid, bytes(1:100)); fclose (fid);
%! printed = evalc ('[checkpoint, info] = ckpt_load_latest (folder);');
%! assert (checkpoint.step, 2); assert (info.name, 'step_00000002.mat');
%! expect_resume_from_2 (folder, printed, '100 bytes on disk');
%! assert (isfile (fullfile (folder, 'corrupt', 'step_00000003.mat')));
%! rmdir (folder, 's');

%!test
%! confirm_recursive_rmdir (false, 'local');
%! % one byte changed
%! folder = saved_three (); path = fullfile (folder, 'step_00000003.mat');
%! bytes = read_bytes (path); bytes(200) = bitxor (bytes(200), 1);
%! fid = fopen (path, 'w'); fwrite (fid, bytes); fclose (fid);
%! printed = evalc ('checkpoint = ckpt_load_latest (folder);');
%! assert (checkpoint.step, 2);
%! expect_resume_from_2 (folder, printed, 'sha256 does not match');
%! rmdir (folder, 's');

%!test
%! confirm_recursive_rmdir (false, 'local');
%! % garbage whose marker matches: a MAT header, then bytes load does not accept
%! folder = saved_three (); path = fullfile (folder, 'step_00000003.mat');
%! bytes = read_bytes (path);
%! rewrite_with_marker (path, [bytes(1:128), repmat(uint8 (255), 1, 800)]);
%! printed = evalc ('checkpoint = ckpt_load_latest (folder);');
%! assert (checkpoint.step, 2);
%! expect_resume_from_2 (folder, printed, 'its bytes match the marker, but load cannot read them');
%! rmdir (folder, 's');

%!test
%! confirm_recursive_rmdir (false, 'local');
%! % a MAT file without the variable 'checkpoint', and a marker that matches it
%! folder = saved_three (); path = fullfile (folder, 'step_00000003.mat');
%! other = 7; save ([path '.other'], 'other', '-v6');
%! rewrite_with_marker (path, read_bytes ([path '.other'])); delete ([path '.other']);
%! printed = evalc ('checkpoint = ckpt_load_latest (folder);');
%! assert (checkpoint.step, 2);
%! expect_resume_from_2 (folder, printed, 'holds no variable ''checkpoint''');
%! rmdir (folder, 's');

%!test
%! confirm_recursive_rmdir (false, 'local');
%! % a function handle in Octave's text format: never loaded, skipped as unsafe
%! folder = saved_three (); path = fullfile (folder, 'step_00000003.mat');
%! checkpoint = struct ('step', 3, 'h', @() 1); save ([path '.other'], 'checkpoint', '-text');
%! rewrite_with_marker (path, read_bytes ([path '.other'])); delete ([path '.other']);
%! printed = evalc ('checkpoint = ckpt_load_latest (folder);');
%! assert (checkpoint.step, 2);
%! assert (! isempty (strfind (printed, 'skipped unsafe checkpoint: step_00000003.mat')), printed);
%! assert (isfile (fullfile (folder, 'corrupt', 'step_00000003.mat')));
%! rmdir (folder, 's');

%!test
%! confirm_recursive_rmdir (false, 'local');
%! % a marker that cannot be read
%! folder = saved_three (); path = fullfile (folder, 'step_00000003.mat');
%! ckpt_write_text_atomic ([path '.json'], '{"step": 3, "kind": "st');
%! printed = evalc ('checkpoint = ckpt_load_latest (folder);');
%! assert (checkpoint.step, 2);
%! expect_resume_from_2 (folder, printed, 'unreadable completion marker');
%! rmdir (folder, 's');

%!test
%! confirm_recursive_rmdir (false, 'local');
%! % a folder where the file was
%! folder = saved_three (); path = fullfile (folder, 'step_00000003.mat');
%! delete (path); mkdir (path);
%! printed = evalc ('checkpoint = ckpt_load_latest (folder);');
%! assert (checkpoint.step, 2);
%! expect_resume_from_2 (folder, printed, 'file is missing');
%! assert (isfolder (fullfile (folder, 'corrupt', 'step_00000003.mat')));
%! rmdir (folder, 's');

%!test
%! confirm_recursive_rmdir (false, 'local');
%! % everything damaged: a fresh start, nothing left to check at the next one
%! folder = saved_three ();
%! for step = 1:3
%!   fclose (fopen (fullfile (folder, sprintf ('step_%08d.mat', step)), 'w'));
%! end
%! printed = evalc ('[checkpoint, info] = ckpt_load_latest (folder);');
%! assert (isempty (checkpoint)); assert (isempty (info));
%! assert (numel (strfind (printed, 'skipped corrupt checkpoint')), 3);
%! assert (numel (dir (fullfile (folder, 'corrupt', '*.mat'))), 3);
%! assert (evalc ('ckpt_load_latest (folder);'), '');
%! rmdir (folder, 's');
